"""save_pretrained as transformers': into a directory that may hold other files, replacing only
its own files of an earlier save, refusing others', and never leaving a mix of two saves that
loads (gemma3.atomic.OwnedSave)."""

import json
import os

import numpy as np
import pytest

from gemma3 import NPUGemma3ForCausalLM, facade
from gemma3 import atomic as atomic_module
from gemma3.facade import MANIFEST
from tests.gemma3.oracle import tiny_model

pytest.importorskip("torch", reason="the oracle extra is not installed")

RBLN = dict(rbln_npu="tiny", rbln_numerics="fp32", rbln_prefill_chunk_size=64)
IDS = np.random.default_rng(0).integers(3, 300, size=(1, 20))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two compilations of one tiny checkpoint that save different files (max_seq_len 256 and
    128: rbln_config.json and the plans differ), with the tokens each generates."""
    src = tmp_path_factory.mktemp("hf")
    tiny_model(src)
    out = {}
    for name, seq in (("a", 256), ("b", 128)):
        model = NPUGemma3ForCausalLM.from_pretrained(src, rbln_max_seq_len=seq, **RBLN)
        out[name] = (model, model.generate(IDS, max_new_tokens=8))
    return src, out


def snapshot(directory):
    """Every file under ``directory``: relative path -> bytes."""
    out = {}
    for root, _, files in os.walk(directory):
        for f in files:
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, directory)] = fh.read()
    return out


def reload_generates(directory, want):
    again = NPUGemma3ForCausalLM.from_pretrained(directory)
    np.testing.assert_array_equal(again.generate(IDS, max_new_tokens=8), want)
    return again


def test_new_and_nested_new_directories(models, tmp_path):
    _, out = models
    model, tokens = out["a"]
    for target in (tmp_path / "new", tmp_path / "x" / "y" / "z"):
        model.save_pretrained(target)
        files = set(snapshot(target))
        assert {
            "config.json",
            "generation_config.json",
            "rbln_config.json",
            MANIFEST,
            "compiled/weights.safetensors",
            "compiled/plans.json",
        } <= files
        assert not any(p.startswith(".") for p in os.listdir(target))  # no staging left
        reload_generates(target, tokens)


def test_resave_replaces_our_files_and_leaves_others_untouched(models, tmp_path):
    _, out = models
    target = tmp_path / "saved"
    out["a"][0].save_pretrained(target)
    (target / "README.md").write_text("my notes")
    (target / "compiled" / "mine.bin").write_bytes(b"\x00\x01")
    stamp = os.stat(target / "README.md").st_mtime_ns
    out["b"][0].save_pretrained(target)
    assert (target / "README.md").read_text() == "my notes"
    assert os.stat(target / "README.md").st_mtime_ns == stamp
    assert (target / "compiled" / "mine.bin").read_bytes() == b"\x00\x01"
    again = reload_generates(target, out["b"][1])
    assert again.rbln_config.max_seq_len == 128
    out["b"][0].save_pretrained(target)  # the same save again: our files, identical bytes
    reload_generates(target, out["b"][1])


def test_foreign_files_are_refused_and_nothing_changes(models, tmp_path):
    src, out = models
    model = out["a"][0]
    before = snapshot(src)
    with pytest.raises(
        FileExistsError, match=r"will not overwrite \['config.json', 'generation_config.json'\]"
    ):
        model.save_pretrained(src)  # the checkpoint's own directory: its config.json is not ours
    assert snapshot(src) == before
    target = tmp_path / "saved"
    model.save_pretrained(target)
    (target / "generation_config.json").write_text('{"eos_token_id": 7}')  # edited since: not ours
    (target / "compiled" / "plans.json").unlink()
    (target / "compiled" / "plans.json").mkdir()  # a directory where our file goes
    before = snapshot(target)
    with pytest.raises(
        FileExistsError, match=r"will not overwrite \['compiled/plans.json', 'generation_config.json'\]"
    ):
        model.save_pretrained(target)
    assert snapshot(target) == before and (target / "compiled" / "plans.json").is_dir()


def test_a_manifest_not_ours_is_a_collision(models, tmp_path):
    (tmp_path / MANIFEST).write_text("{}")
    with pytest.raises(FileExistsError, match=rf"will not overwrite \['{MANIFEST}'\]"):
        models[1]["a"][0].save_pretrained(tmp_path)
    assert snapshot(tmp_path) == {MANIFEST: b"{}"}


def test_a_path_that_is_a_file_is_an_error(models, tmp_path):
    model = models[1]["a"][0]
    target = tmp_path / "saved"
    model.save_pretrained(target)
    before = snapshot(target)
    with pytest.raises(NotADirectoryError, match=r"config.json is an existing file, not a directory"):
        model.save_pretrained(target / "config.json")
    with pytest.raises(NotADirectoryError, match=r"config.json is an existing file, not a directory"):
        model.save_pretrained(target / "config.json" / "deeper")
    assert snapshot(target) == before


def test_a_failed_first_save_leaves_no_directory(models, tmp_path, monkeypatch):
    def fail(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(facade, "save_plans", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        models[1]["a"][0].save_pretrained(tmp_path / "x" / "y")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("where", ["weights", "plans"])
def test_an_error_while_staging_leaves_the_earlier_save(models, tmp_path, monkeypatch, where):
    _, out = models
    target = tmp_path / "saved"
    out["a"][0].save_pretrained(target)
    before = snapshot(target)
    if where == "weights":

        def half_then_fail(path, tensors, metadata=None):
            with open(path, "wb") as f:
                f.write(b"\x00" * 100)  # half-written, as a writer cut off would leave it
            raise OSError("disk full")

        monkeypatch.setattr(facade, "write_safetensors", half_then_fail)
    else:
        monkeypatch.setattr(facade, "save_plans", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        out["b"][0].save_pretrained(target)
    assert snapshot(target) == before
    assert not [p for p in os.listdir(target) if p.startswith(".")]
    reload_generates(target, out["a"][1])


def failing_move(monkeypatch, at):
    """Make the commit's ``at``-th rename raise (later ones, the rollback's, succeed)."""
    real, calls = atomic_module._move, []

    def move(src, dst):
        calls.append(dst)
        if len(calls) == at:
            raise OSError("killed")
        real(src, dst)

    monkeypatch.setattr(atomic_module, "_move", move)
    return calls


@pytest.mark.parametrize("at", [1, 2, 5, 12])  # 12 moves: 6 files, each after its old one; 12 = manifest
def test_an_error_between_renames_rolls_back_to_the_earlier_save(models, tmp_path, monkeypatch, at):
    _, out = models
    target = tmp_path / "saved"
    out["a"][0].save_pretrained(target)
    before = snapshot(target)
    calls = failing_move(monkeypatch, at)
    with pytest.raises(OSError, match="killed"):
        out["b"][0].save_pretrained(target)
    assert len(calls) >= at and calls[at - 1].endswith(MANIFEST) == (at == 12)
    assert snapshot(target) == before
    assert not [p for p in os.listdir(target) if p.startswith(".")]
    reload_generates(target, out["a"][1])


def test_a_save_killed_between_renames_does_not_load_and_a_new_save_recovers(models, tmp_path, monkeypatch):
    _, out = models
    target = tmp_path / "saved"
    out["a"][0].save_pretrained(target)
    (target / "notes.txt").write_text("keep")
    failing_move(monkeypatch, 5)
    for step in ("_rollback", "_abandon"):  # the process died: no clean-up ran
        monkeypatch.setattr(atomic_module.OwnedSave, step, lambda *a: None)
    with pytest.raises(OSError, match="killed"):
        out["b"][0].save_pretrained(target)
    monkeypatch.undo()
    assert (target / f"{MANIFEST}.pending").exists()  # the journal: a mix of two saves
    assert [p for p in os.listdir(target) if p.startswith(".npu-saving-")]  # and the staging
    with pytest.raises(ValueError, match=r"interrupted while moving its files into place"):
        NPUGemma3ForCausalLM.from_pretrained(target)
    out["b"][0].save_pretrained(target)  # the journal makes both saves' files ours
    assert sorted(os.listdir(target)) == sorted(
        [
            "compiled",
            "config.json",
            "generation_config.json",
            "notes.txt",
            "rbln_config.json",
            MANIFEST,
        ]
    )
    reload_generates(target, out["b"][1])


def test_files_of_the_earlier_save_that_the_new_one_does_not_write_go(models, tmp_path, monkeypatch):
    _, out = models
    model = out["a"][0]
    target = tmp_path / "saved"

    def with_tokenizer(directory):
        for name in ("tokenizer.json", "tokenizer_config.json"):
            with open(os.path.join(directory, name), "w") as f:
                f.write("{}")

    monkeypatch.setattr(model, "_save_files", with_tokenizer)
    model.save_pretrained(target)
    (target / "tokenizer_config.json").write_text('{"mine": 1}')  # changed since: no longer ours
    monkeypatch.undo()
    out["b"][0].save_pretrained(target)  # writes no tokenizer
    assert not (target / "tokenizer.json").exists()
    assert (target / "tokenizer_config.json").read_text() == '{"mine": 1}'
    reload_generates(target, out["b"][1])


def test_the_image_model_saves_its_processor_files_beside_others(tmp_path):
    from gemma3 import NPUGemma3ForConditionalGeneration
    from tests.gemma3.oracle import tiny_image_model

    src = tmp_path / "hf"
    tiny_image_model(src)
    (src / "preprocessor_config.json").write_text('{"image_processor_type": "Gemma3ImageProcessor"}')
    model = NPUGemma3ForConditionalGeneration.from_pretrained(
        src,
        rbln_npu="tiny",
        rbln_numerics="fp32",
        rbln_language_model={"prefill_chunk_size": 64, "max_seq_len": 64},
    )
    ids = np.array([[2, 5, 297, 299, 299, 299, 299, 298, 7]])
    pixels = np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)
    want = model.generate(ids, pixel_values=pixels, max_new_tokens=4)
    target = tmp_path / "saved"
    target.mkdir()
    (target / "README.md").write_text("mine")
    model.save_pretrained(target)
    model.save_pretrained(target)  # again, over our own files
    assert (target / "README.md").read_text() == "mine"
    manifest = json.loads((target / MANIFEST).read_text())["files"]
    assert "preprocessor_config.json" in manifest and "README.md" not in manifest
    with pytest.raises(
        FileExistsError,
        match=r"will not overwrite \['config.json', 'generation_config.json', 'preprocessor_config.json'\]",
    ):
        model.save_pretrained(src)
    again = NPUGemma3ForConditionalGeneration.from_pretrained(target)
    np.testing.assert_array_equal(again.generate(ids, pixel_values=pixels, max_new_tokens=4), want)
