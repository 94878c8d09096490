"""A pipeline bound to the model it names, and what binding finds: refusals (the pipeline cannot decide with that
model) and warnings (it can, but likely not as its author meant).

One place for the registry's loads and uploads and for ``aios-kernel pipelines check``, which runs the same checks
with no kernel (a pipeline author's walk-through: binding errors showed only against a running kernel). Warnings are
never refusals: a pipeline file that served before an upgrade serves after it (a review of that walk-through's
fixes).
"""

from __future__ import annotations

from dataclasses import replace

from ..policy import Policy
from ..policy.analysis import MAX_ERRORS
from ..policy.syntax import null_tests
from ..policy.within import findings, input_domain
from .fields import show_number
from .spec import Pipeline, compared_strings


def bind(pipeline: Pipeline, hub, upload: bool = False) -> Pipeline:
    """``pipeline`` bound to the version of the model it names in ``hub``, checked against it: loaded, input
    width, output labels, and the policy's classes, ``score.<class>`` reads and ``label`` literals against those
    labels; PipelineError naming the pipeline's line and key otherwise."""
    mv = hub.get(pipeline.model, pipeline.model_version)
    fail = pipeline.model_error
    if mv is None:
        which = f"version '{pipeline.model_version}'" if pipeline.model_version else "any version"
        then = ("load the model, then upload again (a refused upload is not kept)" if upload
                else "the pipeline is tried again when the model loads")
        raise fail("name", f"model '{pipeline.model}' ({which}) is not loaded; {then}")
    config = mv.config
    inputs = {spec.name: spec for spec in config.inputs}
    outputs = {spec.name: spec for spec in config.outputs}
    if pipeline.input not in inputs:
        raise fail("input", f"model '{mv.name}' has no input '{pipeline.input}' (has {', '.join(inputs)})")
    if len(inputs) != 1:
        raise fail("input", f"model '{mv.name}' takes {len(inputs)} inputs; pipelines feed exactly one")
    kind = inputs[pipeline.input].datatype.name
    if kind != "FP32":  # (it bound, and then every decision failed in onnxruntime: a FALLBACK each)
        raise fail("input", f"'{pipeline.input}' of model '{mv.name}' takes {kind}; pipelines encode FP32 rows")
    dims = inputs[pipeline.input].dims
    if tuple(dims) not in ((pipeline.width,), (-1,)):
        raise fail("input", f"the fields encode {pipeline.width} columns but '{pipeline.input}' takes {list(dims)}")
    if pipeline.output not in outputs:
        raise fail("output", f"model '{mv.name}' has no output '{pipeline.output}' (has {', '.join(outputs)})")
    labels = outputs[pipeline.output].labels
    if not labels:
        raise fail("output", f"output '{pipeline.output}' of '{mv.name}' has no class `labels` in its model.toml")
    if not config.batching:
        raise fail("name", f"model '{mv.name}' does not batch (max_batch_size = 0); pipelines need a batch dim")
    check_classes(pipeline, f"output '{pipeline.output}' of model '{mv.name}' version {mv.version}", labels)
    return replace(pipeline, bound_version=mv.version)


def binding_warnings(pipeline: Pipeline, hub) -> list[str]:
    """What a bound pipeline serves with that is likely not what its author meant: warnings, not refusals (a file
    that served before an upgrade must serve after it; a review of a walk-through's fixes)."""
    policy = [f"pipeline {pipeline.name}: policy {warning.path}:{warning.line}: {warning.subject}: {warning.message}"
              for warning in getattr(pipeline.policy, "warnings", ())]  # (what `policy check` says of it)
    return [*pipeline.warnings, *policy, *foreign_labels(pipeline, hub), *dead_null_tests(pipeline),
            *narrowed_verdicts(pipeline, hub), *filter(None, [unlike_probabilities(pipeline, hub)])]


def foreign_labels(pipeline: Pipeline, hub) -> list[str]:
    """A rule comparing ``label`` with a class the model does not have (a policy without [model] classes takes
    any string): that comparison never holds (a pipeline author's walk-through: `label == 'fraud'`)."""
    mv = hub.get(pipeline.model, pipeline.bound_version)
    labels = next((spec.labels for spec in getattr(getattr(mv, "config", None), "outputs", ())
                   if spec.name == pipeline.output), None)
    if not labels:
        return []
    source = getattr(pipeline.policy, "source", "") or "the policy"
    return [f"pipeline {pipeline.name}: rule {rule.id} ({source}:{rule.line}) compares label with {value!r}, which "
            f"model {mv.name}/{mv.version} never answers (labels {list(labels)})"
            for rule, name, value in compared_strings(pipeline.policy) if name == "label" and value not in labels]


def unlike_probabilities(pipeline: Pipeline, hub) -> str | None:
    """A warning when the model's class scores left [0, 1] at its load-time probe (an all-zeros and an
    all-ones row): logits, say, where confidence (the largest score) and ``min_confidence`` (0..1) expect
    probabilities (a pipeline author's walk-through: 'confidence 5.245', and no escalation for it ever)."""
    mv = hub.get(pipeline.model, pipeline.bound_version)
    probed = getattr(getattr(mv, "runtime", None), "probed_ranges", {}).get(pipeline.output)
    if probed is None or (-1e-6 <= probed[0] and probed[1] <= 1 + 1e-6):
        return None
    return (f"pipeline {pipeline.name}: output '{pipeline.output}' of model {mv.name}/{mv.version} gave scores "
            f"from {probed[0]:.4g} to {probed[1]:.4g} for an all-zeros and an all-ones row: not probabilities "
            f"(end the model with a Softmax or Sigmoid); confidence is the largest score and "
            f"[escalation].min_confidence (0 to 1) compares with it")


def dead_null_tests(pipeline: Pipeline) -> list[str]:
    """A rule testing ``x is null`` where the pipeline gives every request an ``x`` (it is required, or takes its
    default): never true when served, though ``policy test`` rows that leave ``x`` out pass it (a pipeline author's
    walk-through). A warning, not a refusal: the policy may serve other pipelines where ``x`` can be missing."""
    fields = {spec.name: spec for spec in pipeline.fields}
    source = getattr(pipeline.policy, "source", "") or "the policy"
    out = []
    for rule in getattr(pipeline.policy, "rules", ()):
        node = getattr(rule, "node", None)
        for name in dict.fromkeys(null_tests(node) if node is not None else ()):
            spec = fields.get(name)
            if spec is not None:
                given = "it is required" if spec.required else f"it takes its default, {spec.default!r}"
                out.append(f"pipeline {pipeline.name}: rule {rule.id} ({source}:{rule.line}) tests whether {name} is "
                           f"null, which it never is here ({given} when a request leaves it out)")
    return out


MAX_NARROWED_SHOWN = 10  # warnings listed per pipeline; the rest are counted


def narrowed_verdicts(pipeline: Pipeline, hub) -> list[str]:
    """The policy's table checked again over the rows this pipeline sends it (``policy/within.py``): rules that
    can never fire here, or are never reached here, and a default never needed here, which the policy's own check
    (over every value) could not say. ``x is null`` on a field the pipeline fills is ``dead_null_tests``' warning."""
    policy = pipeline.policy
    if not isinstance(policy, Policy) or not policy.analysis_complete:  # (a table too large to check fully is
        return []  # not checked again here either)
    fields = {spec.name: spec for spec in pipeline.fields}
    domains, shown = {}, []
    for name, ftype in policy.inputs.items():
        spec = fields.get(name)
        if spec is None or name not in policy.reads:
            continue
        values = tuple(spec.values) + ((spec.default,) if isinstance(spec.default, str) and spec.values else ())
        domains[name] = input_domain(ftype, spec.min, spec.max, values)
        if spec.min is not None or spec.max is not None:
            low = show_number(spec.min) if spec.min is not None else ""
            shown.append(f"{name} {low}..{show_number(spec.max) if spec.max is not None else ''}")
        elif values:
            shown.append(f"{name} one of {', '.join(map(repr, dict.fromkeys(values)))}")
    mv = hub.get(pipeline.model, pipeline.bound_version)
    outputs = {spec.name: spec for spec in getattr(getattr(mv, "config", None), "outputs", ())}
    labels = getattr(outputs.get(pipeline.output), "labels", None)
    if labels and "label" in policy.reads:
        domains["label"] = input_domain("string", None, None, tuple(labels))
    if not domains:
        return []
    source = getattr(policy, "source", "") or "the policy"
    given = "; ".join(["no input missing", *shown])
    out = []
    found = findings(policy, domains)
    for rule, message in found[:MAX_NARROWED_SHOWN]:
        what = f"rule {rule.id} ({source}:{rule.line})" if rule is not None else f"policy {source}"
        out.append(f"pipeline {pipeline.name}: {what}: {message}, for the requests this pipeline sends ({given})")
    if len(found) > MAX_NARROWED_SHOWN:  # (a rate table past a field's max: thousands of rules, one line each)
        more = len(found) - MAX_NARROWED_SHOWN
        counted = f"at least {more}" if len(found) >= MAX_ERRORS else str(more)  # (the analysis stops listing there)
        out.append(f"pipeline {pipeline.name}: and {counted} more rules of {source} like these, for the requests "
                   "this pipeline sends")
    return out


def check_classes(pipeline: Pipeline, output: str, labels) -> None:
    """The policy's ``[model] classes`` and its ``score.<class>`` reads against the model's labels: a
    mismatch would fail every decision as the caller's error (INVALID_ARGUMENT), so it fails the load."""
    policy = pipeline.policy
    classes = getattr(policy, "classes", None)
    source = getattr(policy, "source", "") or "the policy"
    if classes is not None and set(classes) != set(labels):
        raise pipeline.model_error("output", f"the policy {source} declares classes {list(classes)} but {output} "
                                             f"has labels {list(labels)}")
    unknown = [name for name in getattr(policy, "reads", {}) if name.startswith("score.") and name[6:] not in labels]
    if unknown:
        raise pipeline.model_error("output", f"the policy {source} reads {', '.join(unknown)} but {output} has "
                                             f"no such class (labels {list(labels)})")
