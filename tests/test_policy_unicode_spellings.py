"""A composed and a decomposed spelling of one word ("é" as U+00E9, and as "e" + U+0301) are two strings everywhere:
the request's field reading, both compiled evaluators and the reference, the table analysis and ``policy test``
(``kernel/policy/__init__.py``: strings compare code point by code point; nothing normalizes). Any step that
normalized alone would decide a request otherwise than the rest, or than ``policy test`` said it would.
"""

from __future__ import annotations

import grpc
import pytest

from claims_support import claim_request
from conftest import module_claims_kernel
from examples.claims import data
from kernel._proto.aios.kernel.v1 import kernel_pb2 as kpb
from kernel._proto.aios.kernel.v1 import kernel_pb2_grpc as kgrpc
from kernel.policy import parse_policy
from kernel.policy.backends import available

NFC, NFD = "\u00e9", "e\u0301"


def _edit(folder):
    pipeline = folder / "claims_triage.toml"
    pipeline.write_text(pipeline.read_text() + (
        '\n[[field]]\nname = "region"\ntype = "string"\ndefault = "none"\nencode = "none"\n'
        f'\n[[field]]\nname = "zone"\ntype = "string"\ndefault = "{NFC}"\nvalues = ["{NFC}", "z"]\nencode = "none"\n'))
    policy = folder / "policy.toml"
    text = policy.read_text().replace('has_police_report = "bool"\n', 'has_police_report = "bool"\nregion = "string"\n'
                                      'zone = "string"\n', 1)
    at = text.index('[[rule]]\nid = "R01"')
    policy.write_text(text[:at] + f'[[rule]]\nid = "U1"\nwhen = "region == \'{NFC}\' and zone != \'z\'"\n'
                                  'action = "review"\nescalate = true\n\n' + text[at:])


server, channel = module_claims_kernel("unicode_spellings", edit_pipelines=_edit)


def _decide(channel, **fields):
    case = data.generate_cases(1, seed=11)[0]
    request = claim_request(case)
    for name, value in fields.items():
        request.fields[name].string_value = value
    return kgrpc.DecisionServiceStub(channel).Decide(request, timeout=30)


def test_the_kernel_tells_the_spellings_apart(channel):
    assert [r.rule_id for r in _decide(channel, region=NFC).reasons] == ["U1"]
    assert "U1" not in [r.rule_id for r in _decide(channel, region=NFD).reasons]
    with pytest.raises(grpc.RpcError) as info:  # a field's values refuse the other spelling, naming the field
        _decide(channel, region=NFC, zone=NFD)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "field 'zone'" in info.value.details()
    assert _decide(channel, region=NFC, zone=NFC).outcome == kpb.ESCALATED


def test_every_evaluator_and_the_analysis_tell_them_apart_alike():
    text = ('[policy]\nname = "u"\nversion = "1"\nhit_policy = "UNIQUE"\n[inputs]\ns = "string"\n'
            '[outputs]\nactions = ["a", "b", "c"]\n'
            f'[[rule]]\nid = "C"\nwhen = "s == \'{NFC}\'"\naction = "a"\n'
            f'[[rule]]\nid = "D"\nwhen = "s == \'{NFD}\'"\naction = "b"\n'
            '[[rule]]\nid = "X"\ndefault = true\naction = "c"\n')
    policy = parse_policy(text)  # UNIQUE: the analysis finds the two rules disjoint
    rows = [{"s": NFC}, {"s": NFD}, {"s": "e"}, {"s": None}]
    expected = [("C",), ("D",), ("X",), ("X",)]
    assert policy.evaluate_reference(rows).fired == expected
    for backend in available():
        assert policy.using(backend).evaluate_rows(rows).fired == expected, backend
