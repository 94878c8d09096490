"""What the pipeline folder's watcher sees (found by a pipeline owner's audit, 2026-11-27): a moved file, a
header written another way, a file cut before its table, a policy in a subfolder or behind a symlink, a
change that keeps size and time, a file caught half-written, oversized files, long or invisible labels.

Each is a real folder on disk and real looks (``PipelineRegistry.reload``), as the kernel's watcher makes them.
"""

from __future__ import annotations

import hashlib
import os

import pytest
from claims_support import copy_pipelines, loaded_hub

from kernel.errors import FailedPrecondition, NotFound
from kernel.pipelines import PipelineRegistry
from kernel.policy import load_policy, parse_policy


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    return loaded_hub(tmp_path_factory.mktemp("claims_models"))


@pytest.fixture
def folder(tmp_path):
    return copy_pipelines(tmp_path / "pipelines")


@pytest.fixture
def registry(hub, folder):
    registry = PipelineRegistry(folder, hub, load_policy, parse_policy, poll_s=0)
    assert registry.reload() == ["claims_triage"] and registry.errors == {}
    return registry


def _stricter(policy_text: str) -> str:
    changed = policy_text.replace("fraud_score >= 0.8", "fraud_score >= 0.7", 1)
    assert changed != policy_text
    return changed


def test_a_pipeline_file_moved_in_the_folder_keeps_serving_from_its_new_name(registry, folder):
    """``mv claims_triage.toml claims_triage_v2.toml`` took the pipeline down at the second look."""
    running = registry.get("claims_triage")
    (folder / "claims_triage.toml").rename(folder / "claims_triage_v2.toml")
    for _ in range(3):  # the first look finds the move, the next ones must not lose the pipeline
        registry.reload()
        served = registry.get("claims_triage")
        assert served.hash == running.hash and served.path == str(folder / "claims_triage_v2.toml")
    assert registry.errors == {}


@pytest.mark.parametrize("header", ["[pipeline]   # what requests name", "[ pipeline ]", '["pipeline"]'])
def test_a_pipeline_table_written_another_way_is_a_pipeline(hub, folder, header):
    """Only a line reading exactly ``[pipeline]`` made a file a pipeline: these were skipped without a word."""
    target = folder / "claims_triage.toml"
    target.write_text(target.read_text().replace("[pipeline]\n", header + "\n", 1))
    registry = PipelineRegistry(folder, hub, load_policy, parse_policy, poll_s=0)
    assert registry.reload() == ["claims_triage"] and registry.errors == {}


@pytest.mark.parametrize("damage", ["emptied", "cut before its [pipeline] table"])
def test_a_serving_pipeline_file_that_lost_its_table_is_refused_and_keeps_serving(registry, folder, damage):
    running = registry.get("claims_triage")
    target = folder / "claims_triage.toml"
    text = target.read_text()
    target.write_text("" if damage == "emptied" else text[:text.index("[pipeline]")])
    assert registry.reload() == []
    assert registry.get("claims_triage") is running
    assert str(target) in registry.errors and "pipeline" in registry.errors[str(target)]


def test_a_toml_file_that_is_no_pipeline_and_no_policy_is_listed_as_not_served(registry, folder):
    stray = folder / "draft.toml"
    stray.write_text('[policy]\nname = "draft"\n')
    registry.reload()
    assert "no [pipeline] table, and no pipeline in this folder reads it" in registry.errors[str(stray)]
    stray.unlink()
    registry.reload()
    assert registry.errors == {}


def test_unreadable_toml_no_pipeline_reads_is_refused_with_its_line(registry, folder):
    broken = folder / "new_pipeline.toml"
    broken.write_text('[pipeline]\nname = "x\n')
    registry.reload()
    assert registry.errors[str(broken)].startswith(f"{broken}:2: not valid TOML")


def test_a_policy_in_a_subfolder_is_watched(hub, folder):
    (folder / "rules").mkdir()
    (folder / "policy.toml").rename(folder / "rules" / "policy.toml")
    target = folder / "claims_triage.toml"
    target.write_text(target.read_text().replace('file = "policy.toml"', 'file = "rules/policy.toml"', 1))
    registry = PipelineRegistry(folder, hub, load_policy, parse_policy, poll_s=0)
    assert registry.reload() == ["claims_triage"]
    before = registry.get("claims_triage").policy.hash
    policy = folder / "rules" / "policy.toml"
    policy.write_text(_stricter(policy.read_text()))
    assert registry.reload() == ["claims_triage"]
    assert registry.get("claims_triage").policy.hash != before


def test_a_policy_swapped_for_a_symlink_and_its_target_edited_are_both_seen(registry, folder, tmp_path):
    """The usual ``ln -sfn`` deployment: the symlink swap was not seen, nor any later edit of its target."""
    before = registry.get("claims_triage").policy.hash
    releases = tmp_path / "releases"
    releases.mkdir()
    release = releases / "policy-v2.toml"
    release.write_text(_stricter((folder / "policy.toml").read_text()))
    link = folder / ".policy.toml.new"
    link.symlink_to(release)
    os.replace(link, folder / "policy.toml")  # atomically: the file becomes a symlink
    assert registry.reload() == ["claims_triage"]
    swapped = registry.get("claims_triage").policy.hash
    assert swapped != before
    release.write_text(release.read_text().replace("fraud_score >= 0.7", "fraud_score >= 0.75", 1))
    assert registry.reload() == ["claims_triage"]
    assert registry.get("claims_triage").policy.hash not in (before, swapped)


def test_a_change_that_keeps_size_and_modification_time_is_seen(registry, folder):
    """``cp -p`` / ``rsync -t`` of a file with the same size: mtime and size alone missed it."""
    policy = folder / "policy.toml"
    stat = policy.stat()
    before = registry.get("claims_triage").policy.hash
    text = policy.read_text()
    changed = text.replace("fraud_score >= 0.8", "fraud_score >= 0.7", 1)
    assert len(changed) == len(text)
    policy.write_text(changed)
    os.utime(policy, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert policy.stat().st_size == stat.st_size and policy.stat().st_mtime_ns == stat.st_mtime_ns
    assert registry.reload() == ["claims_triage"]
    assert registry.get("claims_triage").policy.hash != before


def test_the_watcher_takes_a_changed_file_once_a_second_look_finds_it_unchanged(registry, folder):
    """A file caught half-written (a valid prefix) was served at once; the watcher's looks now wait a look."""
    before = registry.get("claims_triage").policy.hash
    policy = folder / "policy.toml"
    text = policy.read_text()
    policy.write_text(_stricter(text))
    assert registry.reload(settle=True) == []  # first look: changed, not taken yet
    assert registry.get("claims_triage").policy.hash == before
    policy.write_text(_stricter(text).replace("fraud_score >= 0.7", "fraud_score >= 0.75", 1))  # still being written
    assert registry.reload(settle=True) == []  # changed again since: waits again
    assert registry.reload(settle=True) == ["claims_triage"]  # unchanged since the last look: taken
    assert registry.get("claims_triage").policy.hash == hashlib.sha256(policy.read_bytes()).hexdigest()


def test_oversized_files_are_refused_without_being_read(registry, folder):
    """A 300 MB file in the folder took 600 MB of the kernel's memory before its size was checked."""
    running = registry.get("claims_triage")
    for name, what in (("claims_triage.toml", "a pipeline file"), ("policy.toml", "a policy file")):
        target = folder / name
        original = target.read_bytes()
        with open(target, "ab") as fh:
            fh.truncate(len(original) + (64 << 20))  # sparse: 64 MiB of zeros, no disk taken
        registry.reload()
        assert registry.get("claims_triage") is running
        message = registry.errors[str(folder / "claims_triage.toml")]
        assert f"{what} may have at most 1,048,576" in message and "it was not read" in message, message
        target.write_bytes(original)
        registry.reload()
        assert registry.errors == {}


def test_a_truncated_pipeline_file_is_refused_at_its_last_line(hub, folder):
    target = folder / "claims_triage.toml"
    lines = target.read_text().splitlines()
    cut = "\n".join(lines[:35]) + '\n[[field]]\nname = "x"\nencode ='
    target.write_text(cut)
    registry = PipelineRegistry(folder, hub, load_policy, parse_policy, poll_s=0)
    registry.reload()
    assert registry.errors[str(target)].startswith(f"{target}:{cut.count(chr(10)) + 1}: not valid TOML")


@pytest.mark.parametrize("label, needle", [
    ("v" * 129, "is 129 characters; at most 128"),
    ("2026-11-25.1\u200b", "invisible format character U+200B"),
])
def test_policy_version_labels_are_short_and_visible(registry, folder, label, needle):
    """A 500 KB version went into every decision; a zero-width space made two versions that read the same."""
    policy = folder / "policy.toml"
    policy.write_text(policy.read_text().replace('version = "2026-11-25.1"', f'version = "{label}"', 1))
    registry.reload()
    assert needle in registry.errors[str(folder / "claims_triage.toml")]


def test_a_rule_description_may_not_reorder_its_text(registry, folder):
    policy = folder / "policy.toml"
    text = policy.read_text()
    start = text.index('description = "', text.index("[[rule]]")) + len('description = "')
    policy.write_text(text[:start] + "\u202e" + text[start:])
    registry.reload()
    assert "U+202E" in registry.errors[str(folder / "claims_triage.toml")]


@pytest.mark.parametrize("old, new, needles", [
    ("customer_tier in {'gold', 'platinum'}", "customer_tier in {'Gold', 'platinum'}",
     ("rule R08 (", "compares 'customer_tier' with 'Gold', which is not one of the field's values")),
    ("customer_tier in {'gold', 'platinum'}", "customer_tier in {'g\u043eld', 'platinum'}",  # a Cyrillic o
     ("rule R08 (", "compares 'customer_tier' with 'g\u043eld'")),
], ids=["case", "homoglyph"])
def test_a_rule_comparing_a_field_with_a_value_it_never_has_is_refused(registry, folder, old, new, needles):
    """(Pipeline owner's audit) 'Gold' and a look-alike 'g\u043eld' loaded without a word, and R08 could then never
    fire for gold customers; the Decide path refuses those very values."""
    running = registry.get("claims_triage")
    policy = folder / "policy.toml"
    policy.write_text(policy.read_text().replace(old, new, 1))
    assert registry.reload() == []
    assert registry.get("claims_triage") is running
    message = registry.errors[str(folder / "claims_triage.toml")]
    assert all(needle in message for needle in needles), message


@pytest.mark.parametrize("old, new, needle", [
    ('review_actions = ["approve", "deny", "request_info"]', 'review_actions = ["approve\\u001b[2J", "deny"]',
     "[escalation].review_actions: contains the control character '\\x1b'"),
    ('name = "claim_amount"', 'name = "claim_\\u202eamount"', "[[field]] #1.name: contains the invisible format"),
    ('text_fields = ["description", "notes"]', 'text_fields = ["description", "no\\u0000tes"]',
     "[pipeline].text_fields: contains the control character '\\x00'"),
], ids=["review action", "field name", "text field"])
def test_names_a_pipeline_shows_to_people_are_visible_text(registry, folder, old, new, needle):
    """(Pipeline owner's audit) an escape sequence in a review action, a direction override in a field name and
    a NUL in a text field's name loaded, though the same file's version and description were checked."""
    target = folder / "claims_triage.toml"
    text = target.read_text()
    assert old in text
    target.write_text(text.replace(old, new, 1))
    registry.reload()
    assert needle in registry.errors[str(target)], registry.errors[str(target)]


def test_not_found_points_at_refused_files(registry, folder):
    """(Pipeline owner's audit) a pipeline refused at start answered NOT_FOUND "loaded pipelines: (none)", with
    nothing pointing at the refusal."""
    from kernel.errors import NotFound

    (folder / "claims_triage_v2.toml").write_text('[pipeline]\nname = "claims_v2\n')
    registry.reload()
    with pytest.raises(NotFound) as missing:
        registry.get("claims_v2")
    assert missing.value.message.endswith(
        "loaded pipelines: claims_triage; 1 file in the pipeline folder is refused (`aios-kernel pipelines list` "
        "says why)")


def _denied_for(real, path):
    """A fault injected on purpose: ``real`` (os.scandir, os.stat) refuses ``path`` as a folder without read or search
    permission refuses it (tests run as root here, where chmod 000 stops nothing)."""
    def denied(target=".", *args, **kwargs):
        if os.fspath(target) == str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real(target, *args, **kwargs)
    return denied


@pytest.mark.parametrize("fault", ["folder cannot be listed", "pipeline file cannot be looked at"])
def test_a_folder_that_cannot_be_looked_at_unloads_nothing(registry, folder, monkeypatch, fault):
    """chmod 000 on the pipeline folder (chmod 644: listed, but no file in it can be looked at), a mount gone bad:
    glob took the folder for an empty one, a failed stat for a file gone, and the second look unloaded every
    pipeline: Decide NOT_FOUND for all while the files were there (a live-change audit). A look that cannot see the
    folder now changes nothing and says why."""
    served = registry.get("claims_triage")
    if fault == "folder cannot be listed":
        monkeypatch.setattr(os, "scandir", _denied_for(os.scandir, folder))
    else:
        monkeypatch.setattr(os, "stat", _denied_for(os.stat, folder / "claims_triage.toml"))
    for _ in range(3):
        with pytest.raises(OSError, match="Permission denied"):
            registry.reload(settle=True)
    assert registry.get("claims_triage") is served
    assert "cannot be looked at (Permission denied" in registry.errors[str(folder)]
    monkeypatch.undo()
    assert registry.reload(settle=True) == [] and registry.get("claims_triage") is served
    assert registry.errors == {}


def test_a_folder_that_is_gone_still_unloads_its_pipelines(registry, folder, tmp_path):
    """Removing the folder (or every file in it) is still how pipelines stop being served: gone is not unreadable."""
    folder.rename(tmp_path / "moved")
    registry.reload(settle=True)
    assert registry.get("claims_triage")  # (the first look that misses a file waits for the next one)
    registry.reload(settle=True)
    with pytest.raises(NotFound):
        registry.get("claims_triage")


def test_the_policy_of_a_serving_pipeline_whose_file_is_refused_is_not_listed_as_read_by_none(registry, folder):
    """A serving pipeline's file refused before it names its policy (cut to invalid TOML, unreadable): its running
    version still decides with that policy, yet `pipelines list` said of it "not served: it has no [pipeline] table,
    and no pipeline in this folder reads it as its policy"."""
    os.utime(folder / "policy.toml")  # (looked at since the start: a look classifies it)
    registry.reload()
    pipeline = folder / "claims_triage.toml"
    pipeline.write_text(pipeline.read_text().replace("[pipeline]", "[pipeline", 1))
    assert registry.reload() == [] and registry.get("claims_triage")
    assert list(registry.errors) == [str(pipeline)], registry.errors


def test_an_upload_into_a_folder_the_kernel_cannot_read_changes_nothing(registry, folder, monkeypatch):
    """A folder with write and search permission but no read (chmod 311): the upload's file was renamed into place,
    then syncing the folder failed and the answer said "nothing was changed": the next look served it all the same
    (a live-change audit). Now the upload is refused before anything is written."""
    pipeline = folder / "claims_triage.toml"
    before = pipeline.read_bytes()
    real_open = os.open

    def unreadable_folder_open(path, flags, *args, **kwargs):  # the fault: opening the folder to read it is denied
        if os.fspath(path) == str(folder):
            raise PermissionError(13, "Permission denied", str(folder))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "scandir", _denied_for(os.scandir, folder))
    monkeypatch.setattr(os, "open", unreadable_folder_open)
    with pytest.raises(FailedPrecondition) as refusal:
        registry.put(before.replace(b'version = "2026-11-25.1"', b'version = "uploaded"', 1))
    assert refusal.value.message == (f"upload not validated: the pipeline folder {folder} cannot be looked at "
                                     f"(Permission denied: {folder}): make it readable by the user the kernel runs "
                                     "as; nothing was changed")
    monkeypatch.undo()
    assert pipeline.read_bytes() == before and registry.reload(settle=True) == []
    assert registry.get("claims_triage").label == "2026-11-25.1"


@pytest.mark.parametrize("linked", ["policy.toml", "claims_triage.toml"])
def test_an_upload_does_not_replace_a_symlink_with_a_file(hub, folder, tmp_path, linked):
    """A policy shared from another folder (or a ConfigMap's files, links into ``..data/``): an upload replaced the
    link with a plain file, and later changes to the shared file no longer reached this kernel, without a word."""
    shared = tmp_path / "shared"
    shared.mkdir()
    os.replace(folder / linked, shared / linked)
    os.symlink(shared / linked, folder / linked)
    registry = PipelineRegistry(folder, hub, load_policy, parse_policy, poll_s=0)
    assert registry.reload() == ["claims_triage"]
    pipeline, policy = (folder / "claims_triage.toml").read_bytes(), (folder / "policy.toml").read_bytes()
    with pytest.raises(FailedPrecondition, match=f"{folder / linked} is a symbolic link"):
        registry.put(pipeline.replace(b'version = "2026-11-25.1"', b'version = "up"', 1),
                     policy.replace(b'version = "2026-11-25.1"', b'version = "up"', 1))
    assert (folder / linked).is_symlink() and (folder / linked).read_bytes() == (shared / linked).read_bytes()
    assert registry.get("claims_triage").label == "2026-11-25.1"
