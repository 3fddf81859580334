"""The bad-input corpus of issue 16: every case exits 2 with one line, touches no input, leaves nothing.

Each case builds a tiny model tree (``cp/base``, a sharded ``cp/ft1``, ``cp/ft2``, a single file
``cp/a.safetensors``, a model ``other/`` and a ``secret.txt`` outside ``cp``), breaks it the way the
issue describes, and runs ``fuse``.  The whole tree is hashed before and after: inputs are
byte-identical and no output or temporary path is left.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: make the shared test helpers importable
from merge_testkit import fuse, use_test_plugins  # noqa: E402

from fusion_core.output import MARKER  # noqa: E402


@pytest.fixture(autouse=True)
def _plugins(monkeypatch):
    use_test_plugins(monkeypatch)


def tiny(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 3, generator=gen), "b": torch.randn(3, generator=gen)}


def raw_safetensors(path: Path, header: dict | bytes, data: bytes = b"", length: int | None = None) -> Path:
    """A safetensors file with exactly this header and data (no validation: for corrupt files)."""
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes((len(head) if length is None else length).to_bytes(8, "little") + head + data)
    return path


@pytest.fixture
def root(tmp_path):
    cp = tmp_path / "cp"
    for name in ("base", "ft1", "ft2"):
        (cp / name).mkdir(parents=True)
    save_file(tiny(0), str(cp / "base" / "model.safetensors"))
    (cp / "base" / "config.json").write_text(json.dumps({"model_type": "tiny", "torch_dtype": "float32"}))
    (cp / "base" / "tokenizer.json").write_text('{"version": "1.0"}')
    ft1 = tiny(1)
    save_file({"w": ft1["w"]}, str(cp / "ft1" / "model-00001-of-00002.safetensors"))
    save_file({"b": ft1["b"]}, str(cp / "ft1" / "model-00002-of-00002.safetensors"))
    index = {"weight_map": {"w": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (cp / "ft1" / "model.safetensors.index.json").write_text(json.dumps(index))
    (cp / "ft1" / "training_args.bin").write_bytes(b"\x80\x04not really")
    (cp / "ft1" / "checkpoint-100").mkdir()
    save_file(tiny(2), str(cp / "ft2" / "model.safetensors"))
    save_file(tiny(3), str(cp / "a.safetensors"))
    (tmp_path / "other").mkdir()
    save_file(tiny(4), str(tmp_path / "other" / "model.safetensors"))
    (tmp_path / "secret.txt").write_text("root:$6$very-secret-hash:19000:0:99999:7:::\n")
    (tmp_path / "thesis").mkdir()
    (tmp_path / "thesis" / "thesis.tex").write_text("years of work")
    return tmp_path


def tree_hash(root: Path) -> dict[str, str]:
    """Every path under ``root`` with its kind, mode and content hash (links and FIFOs are not followed or read)."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            path = Path(folder) / name
            st = os.lstat(path)
            rel = str(path.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = f"link {os.readlink(path)}"
            elif stat.S_ISREG(st.st_mode):
                out[rel] = f"file {oct(st.st_mode)} {hashlib.sha256(path.read_bytes()).hexdigest()}"
            else:
                out[rel] = f"{stat.S_IFMT(st.st_mode)} {oct(st.st_mode)}"
    return out


def merge_args(root: Path, *extra, out=None, models=("cp/ft1", "cp/ft2")) -> list[str]:
    args = ["merge", "t_mean", "--base", str(root / "cp" / "base")]
    for m in models:
        args += ["--model", str(root / m)]
    return args + ["-o", str(out if out is not None else root / "out"), *extra]


def run_args(root: Path, output_dir: str, *extra) -> list[str]:
    return [
        "run", "method=dummy", "modelpool=files", f"modelpool.base={root / 'cp' / 'a.safetensors'}",
        f"modelpool.models={{m: {root / 'cp' / 'ft2'}}}", "taskpool=weight_stats", "progress=false",
        "evaluate_inputs=false", f"output_dir={output_dir}", *extra,
    ]  # fmt: skip


def _fifo(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.mkfifo(path)


def _symlink(path: Path, target: Path) -> None:
    path.unlink(missing_ok=True)
    path.symlink_to(target)


def _raise_for_temp(monkeypatch, name: str, code: int) -> None:
    """``os.open``/``os.mkdir`` of fuse's temporary output paths fail with ``code`` (EROFS/EACCES as non-root)."""
    real_open, real_mkdir = os.open, os.mkdir

    def fake_open(path, flags, *args, **kwargs):
        if ".fuse-tmp-" in str(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, flags, *args, **kwargs)

    def fake_mkdir(path, *args, **kwargs):
        if ".fuse-tmp-" in str(path):
            raise OSError(code, os.strerror(code), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)


def _disk_full(monkeypatch) -> None:
    def pwrite(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", pwrite)


def _busy_rename(monkeypatch) -> None:
    import fusion_core.output as output

    def rename(src, dst):
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(dst))

    monkeypatch.setattr(output, "rename_noreplace", rename)


def _bad_file(root: Path, header, data: bytes = b"", length: int | None = None) -> Path:
    return raw_safetensors(root / "cp" / "bad.safetensors", header, data, length)


def _with_nonfinite(root: Path, value: float) -> None:
    state = tiny(2)
    state["b"][1] = value
    save_file(state, str(root / "cp" / "ft2" / "model.safetensors"))


F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}

# (id, setup(root, monkeypatch) -> fuse argv, the expected error's regex)
CASES = [
    # --- data loss: --overwrite never destroys what fuse did not write
    ("out-is-parent-of-inputs", lambda r, m: merge_args(r, "--overwrite", out=r / "cp"), r"output .*cp holds the input"),
    ("out-is-input-folder", lambda r, m: merge_args(r, "--overwrite", out=r / "cp" / "ft1"), r"is the input .*ft1"),
    ("out-is-single-file-input", lambda r, m: merge_args(r, "--overwrite", out=r / "cp" / "a.safetensors", models=("cp/a.safetensors", "cp/ft2")), r"is the input .*a\.safetensors"),
    ("out-holds-a-linked-input", lambda r, m: ((r / "cp" / "ft-link").symlink_to(r / "other"), ["merge", "t_avg", "--model", str(r / "cp" / "ft-link"), "--model", str(r / "cp" / "a.safetensors"), "-o", str(r / "cp"), "--overwrite"])[1], r"output .*cp holds the input .*ft-link"),
    ("out-inside-input-folder", lambda r, m: merge_args(r, out=r / "cp" / "base" / "merged"), r"inside the input folder .*base"),
    ("out-unrelated-folder", lambda r, m: merge_args(r, "--overwrite", out=r / "thesis"), r"thesis already exists and was not written by fuse"),
    ("out-unrelated-file", lambda r, m: merge_args(r, "--overwrite", out=r / "thesis" / "thesis.tex"), r"thesis\.tex already exists and was not written by fuse"),
    ("out-is-cwd", lambda r, m: (m.chdir(r / "cp"), merge_args(r, "--overwrite", out="."))[1], r"output \. is the working directory"),
    ("out-holds-cwd", lambda r, m: (m.chdir(r / "cp" / "ft1"), merge_args(r, "--overwrite", out=".."))[1], r"holds the working directory"),
    ("out-missing-parents", lambda r, m: merge_args(r, out=r / "no" / "such" / "deep" / "out"), r"does not exist; create it first \(mkdir -p .*deep\)"),
    ("out-exists-no-overwrite", lambda r, m: ((r / "prev").mkdir(), (r / "prev" / MARKER).write_text("{}"), merge_args(r, out=r / "prev"))[2], r"prev already exists; pass --overwrite to replace it"),
    ("run-output-dir-unrelated", lambda r, m: run_args(r, str(r / "thesis"), "--overwrite"), r"thesis already exists and was not written by fuse"),
    ("run-output-dir-holds-inputs", lambda r, m: run_args(r, str(r / "cp"), "--overwrite"), r"cp holds the input"),
    ("run-output-dir-is-input", lambda r, m: run_args(r, str(r / "cp" / "ft2"), "--overwrite"), r"is the input"),
    ("run-output-dir-cwd", lambda r, m: (m.chdir(r / "thesis"), run_args(r, ".", "--overwrite"))[1], r"is the working directory"),
    ("run-output-dir-missing-parents", lambda r, m: run_args(r, str(r / "no" / "deep" / "out")), r"does not exist; create it first"),
    # --- confinement: nothing outside a model folder is read
    ("index-names-parent-path", lambda r, m: (
        (r / "cp" / "ft1" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../../other/model.safetensors", "b": "model-00002-of-00002.safetensors"}})),
        merge_args(r))[1], r"names '\.\./\.\./other/model\.safetensors', outside the model folder"),
    ("index-names-absolute-path", lambda r, m: (
        (r / "cp" / "ft1" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "/etc/passwd"}})),
        merge_args(r))[1], r"names '/etc/passwd', outside the model folder"),
    ("index-names-link-out", lambda r, m: (
        _symlink(r / "cp" / "ft1" / "model-00001-of-00002.safetensors", r / "other" / "model.safetensors"),
        merge_args(r))[1], r"points outside the model folder"),
    ("weights-link-out", lambda r, m: (_symlink(r / "cp" / "ft2" / "model.safetensors", r / "other" / "model.safetensors"), merge_args(r))[1], r"points outside the model folder"),
    ("tokenizer-link-to-secret", lambda r, m: (_symlink(r / "cp" / "base" / "tokenizer.json", r / "secret.txt"), merge_args(r))[1], r"tokenizer\.json points outside the model folder"),
    ("config-link-to-etc", lambda r, m: (_symlink(r / "cp" / "base" / "config.json", Path("/etc/hostname")), merge_args(r))[1], r"config\.json points outside the model folder"),
    ("weights-fifo", lambda r, m: (_fifo(r / "cp" / "ft2" / "model.safetensors"), merge_args(r))[1], r"model\.safetensors is a FIFO, not a regular file"),
    ("shard-fifo", lambda r, m: (_fifo(r / "cp" / "ft1" / "model-00002-of-00002.safetensors"), merge_args(r))[1], r"is a FIFO"),
    ("index-fifo", lambda r, m: (_fifo(r / "cp" / "ft1" / "model.safetensors.index.json"), merge_args(r))[1], r"index\.json is a FIFO"),
    ("tokenizer-fifo", lambda r, m: (_fifo(r / "cp" / "base" / "tokenizer.json"), merge_args(r))[1], r"tokenizer\.json is a FIFO"),
    ("single-file-fifo", lambda r, m: (_fifo(r / "cp" / "p.safetensors"), merge_args(r, models=("cp/p.safetensors",)))[1], r"p\.safetensors is a FIFO"),
    ("single-file-device", lambda r, m: (_symlink(r / "cp" / "z.safetensors", Path("/dev/zero")), merge_args(r, models=("cp/z.safetensors",)))[1], r"z\.safetensors is a device"),
    # --- crashes and silent oddities: headers validated as the safetensors library does
    ("float-offsets", lambda r, m: (_bad_file(r, {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8.0]}}, bytes(8)), merge_args(r, models=("cp/bad.safetensors",)))[1], r"invalid data_offsets"),
    ("negative-offsets", lambda r, m: (_bad_file(r, {"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, bytes(8)), merge_args(r, models=("cp/bad.safetensors",)))[1], r"invalid data_offsets \(not two non-negative integers\)"),
    ("overlapping-offsets", lambda r, m: (_bad_file(r, {"w": F32x2, "v": F32x2}, bytes(8)), merge_args(r, models=("cp/bad.safetensors",)))[1], r"overlaps the tensor before it"),
    ("gap-in-offsets", lambda r, m: (_bad_file(r, {"w": F32x2, "v": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}}, bytes(24)), merge_args(r, models=("cp/bad.safetensors",)))[1], r"leaves a gap of 8 bytes"),
    ("trailing-data", lambda r, m: (_bad_file(r, {"w": F32x2}, bytes(16)), merge_args(r, models=("cp/bad.safetensors",)))[1], r"cover 8 data bytes but the file holds 16"),
    ("negative-shape", lambda r, m: (_bad_file(r, {"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8)), merge_args(r, models=("cp/bad.safetensors",)))[1], r"invalid shape"),
    ("float-shape", lambda r, m: (_bad_file(r, {"w": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, bytes(8)), merge_args(r, models=("cp/bad.safetensors",)))[1], r"invalid shape"),
    ("offsets-disagree-with-shape", lambda r, m: (_bad_file(r, {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8)), merge_args(r, models=("cp/bad.safetensors",)))[1], r"spans 8 bytes, its shape needs 12"),
    ("unknown-dtype", lambda r, m: (_bad_file(r, {"w": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)), merge_args(r, models=("cp/bad.safetensors",)))[1], r"unsupported dtype 'F33'"),
    ("metadata-not-strings", lambda r, m: (_bad_file(r, {"__metadata__": {"a": 1}, "w": F32x2}, bytes(8)), merge_args(r, models=("cp/bad.safetensors",)))[1], r"__metadata__ is not a map of strings"),
    ("header-not-object", lambda r, m: (_bad_file(r, b"[1, 2]", bytes(8)), merge_args(r, models=("cp/bad.safetensors",)))[1], r"corrupt safetensors header"),
    ("header-not-utf8", lambda r, m: (_bad_file(r, b"\xff\xfe{}", bytes(8)), merge_args(r, models=("cp/bad.safetensors",)))[1], r"corrupt safetensors header"),
    ("header-nested-deeply", lambda r, m: (_bad_file(r, b"[" * 100_000 + b"]" * 100_000), merge_args(r, models=("cp/bad.safetensors",)))[1], r"corrupt safetensors header \(nested too deeply\)"),
    ("header-length-too-large", lambda r, m: (_bad_file(r, {"w": F32x2}, bytes(8), length=10**6), merge_args(r, models=("cp/bad.safetensors",)))[1], r"header length 1000000 for a"),
    ("file-too-small", lambda r, m: ((r / "cp" / "bad.safetensors").write_bytes(b"abc"), merge_args(r, models=("cp/bad.safetensors",)))[1], r"not a safetensors file \(only 3 bytes\)"),
    ("truncated-data", lambda r, m: (_bad_file(r, {"w": F32x2}, bytes(4)), merge_args(r, models=("cp/bad.safetensors",)))[1], r"is truncated: tensor 'w'"),
    ("index-not-json", lambda r, m: ((r / "cp" / "ft1" / "model.safetensors.index.json").write_text("{oops"), merge_args(r))[1], r"is not a valid shard index"),
    ("index-without-weight-map", lambda r, m: ((r / "cp" / "ft1" / "model.safetensors.index.json").write_text("[]"), merge_args(r))[1], r"is not a valid shard index \(no weight_map\)"),
    ("index-shard-missing", lambda r, m: ((r / "cp" / "ft1" / "model-00002-of-00002.safetensors").unlink(), merge_args(r))[1], r"names shard model-00002-of-00002\.safetensors which is missing"),
    ("nan-input", lambda r, m: (_with_nonfinite(r, float("nan")), merge_args(r))[1], r"tensor 'b' of .*ft2 contains NaN values"),
    ("inf-input", lambda r, m: (_with_nonfinite(r, float("inf")), merge_args(r))[1], r"tensor 'b' of .*ft2 contains Inf values"),
    ("shape-mismatch", lambda r, m: (save_file({"w": torch.zeros(4, 4), "b": torch.zeros(3)}, str(r / "cp" / "ft2" / "model.safetensors")), merge_args(r))[1], r"'w'"),
    ("key-mismatch", lambda r, m: (save_file({"w": torch.zeros(4, 3)}, str(r / "cp" / "ft2" / "model.safetensors")), merge_args(r))[1], r"'b'"),
    ("pickle-refused", lambda r, m: (torch.save(tiny(5), str(r / "cp" / "m.bin")), merge_args(r, models=("cp/m.bin",)))[1], r"m\.bin is a pickle checkpoint"),
    ("disk-full-folder", lambda r, m: (_disk_full(m), merge_args(r))[1], r"cannot write .*out: No space left on device; the disk is full"),
    ("disk-full-single-file", lambda r, m: (_disk_full(m), merge_args(r, out=r / "out.safetensors"))[1], r"cannot write \S*/out\.safetensors: No space left on device; the disk is full"),
    ("disk-full-run-save-model", lambda r, m: (_disk_full(m), run_args(r, str(r / "runout"), "save_model=true"))[1], r"cannot write \S*/runout: No space left on device; the disk is full"),
    ("read-only-parent", lambda r, m: (_raise_for_temp(m, "x", errno.EROFS), merge_args(r))[1], r"cannot write \S*/out: Read-only file system; the file system is read-only: write the output elsewhere"),
    ("read-only-parent-single-file", lambda r, m: (_raise_for_temp(m, "x", errno.EROFS), merge_args(r, out=r / "o.safetensors"))[1], r"cannot write \S*/o\.safetensors: Read-only file system"),
    ("permission-denied", lambda r, m: (_raise_for_temp(m, "x", errno.EACCES), merge_args(r))[1], r"cannot write \S*/out: Permission denied; permission denied: write the output to a folder you can write"),
    ("busy-at-rename", lambda r, m: (_busy_rename(m), merge_args(r))[1], r"Device or resource busy; the path is in use"),
    ("read-only-run", lambda r, m: (_raise_for_temp(m, "x", errno.EROFS), run_args(r, str(r / "runout")))[1], r"cannot write \S*/runout: Read-only file system"),
    ("config-not-json-with-dtype", lambda r, m: ((r / "cp" / "base" / "config.json").write_text("{not json"), merge_args(r, "--dtype", "float16"))[1], r"config\.json is not valid JSON, so --dtype float16 cannot be recorded in it"),
    ("same-model-twice", lambda r, m: merge_args(r, models=("cp/ft2", "cp/ft2")), r"ft2 is given twice .* pass --allow-duplicates"),
    ("same-model-through-a-link", lambda r, m: ((r / "cp" / "ft2-link").symlink_to(r / "cp" / "ft2"), merge_args(r, models=("cp/ft2", "cp/ft2-link")))[1], r"is given twice"),
    ("same-weights-copied", lambda r, m: (shutil.copytree(r / "cp" / "ft2", r / "cp" / "ft3"), merge_args(r, models=("cp/ft2", "cp/ft3")))[1], r"ft3 holds the same weights as .*ft2, so they would count double"),
    ("scaling-overflows-to-inf", lambda r, m: merge_args(r, "--set", "scale=3.0e+38"), r"merged tensor .\w. has (Inf|NaN) values, so nothing was written; likely cause: scale=3e\+38"),
    ("scaling-nan", lambda r, m: merge_args(r, "--set", "scale=.nan"), r"scale"),
    ("overflow-into-float16", lambda r, m: merge_args(r, "--set", "scale=1.0e+5", "--dtype", "float16"), r"overflows float16; choose a wider --dtype"),
]  # fmt: skip


@pytest.mark.parametrize("make", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(make, root, capsys, monkeypatch, request):
    match = dict((c[0], c[2]) for c in CASES)[request.node.callspec.id]
    argv = make(root, monkeypatch)
    before = tree_hash(root)
    code, _, err = fuse(capsys, *argv)
    monkeypatch.undo()  # the fake os functions go before the checks read anything
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    import re

    assert re.search(match, lines[0]), lines[0]
    assert "very-secret" not in err and "root:" not in err  # nothing of a file outside the folders is echoed
    assert tree_hash(root) == before  # inputs byte-identical; no output, temp or trash left


def test_the_issue_reproducer_parent_of_inputs_with_overwrite(root, capsys):
    """`fuse merge ties --base cp/base --model cp/ft1 --model cp/ft2 -o cp --overwrite` deleted cp/ before."""
    before = tree_hash(root)
    code, _, err = fuse(capsys, *merge_args(root, "--overwrite", out=root / "cp"))
    assert code == 2 and err.strip() == f"error: output {root / 'cp'} holds the input {root / 'cp' / 'base'}; write the result to a new path"
    assert tree_hash(root) == before and (root / "cp" / "ft1" / "training_args.bin").exists()


def test_output_that_appears_meanwhile_is_never_replaced(root, capsys):
    """Two runs to one new output: the second to finish fails with one line; the first's output stays."""
    out = root / "out"
    code, _, err = fuse(capsys, "merge", "t_race", "--set", f"path={out}", "--base", root / "cp" / "base", "--model", root / "cp" / "ft2", "-o", out)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "appeared while this run was writing" in err
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]
    assert [p.name for p in root.iterdir() if ".fuse-" in p.name] == []


def test_overwrite_replaces_only_what_fuse_wrote(root, capsys):
    out = root / "out"
    assert fuse(capsys, *merge_args(root, out=out))[0] == 0
    assert (out / MARKER).is_file() and json.loads((out / MARKER).read_text())["written_by"] == "fusion"
    code, _, err = fuse(capsys, *merge_args(root, out=out))
    assert code == 2 and "already exists; pass --overwrite" in err
    code, _, err = fuse(capsys, *merge_args(root, "--overwrite", "--set", "scale=0.5", out=out))
    assert code == 0, err
    single = root / "m.safetensors"
    assert fuse(capsys, *merge_args(root, out=single))[0] == 0
    assert fuse(capsys, *merge_args(root, "--overwrite", "--set", "scale=0.5", out=single))[0] == 0
    assert [p.name for p in root.iterdir() if ".fuse-" in p.name] == []


def test_stale_temps_of_dead_processes_are_removed_with_a_note(root, capsys):
    dead = root / ".out.fuse-tmp-999999999.12345.deadbeef-abcd1234"  # a pid that cannot exist, another boot
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(bytes(3000))
    legacy = root / ".out.fuse-tmp-999999998-abcd1234"  # the name older versions used
    legacy.write_bytes(bytes(10))
    from fusion_core.cleanup import owner_tag

    alive = root / f".other.fuse-tmp-{owner_tag()}-0000abcd"  # this process: kept
    alive.mkdir()
    code, _, err = fuse(capsys, *merge_args(root))
    assert code == 0, err
    assert not dead.exists() and not legacy.exists() and alive.exists()
    assert f"note: removed {dead}, left by an interrupted fuse run (pid 999999999): 3.0 KB freed" in err


def test_sigterm_cleans_up_like_ctrl_c(root, capsys):
    before = tree_hash(root)
    code, _, err = fuse(capsys, "merge", "t_sigterm", "--base", root / "cp" / "base", "--model", root / "cp" / "ft2", "-o", root / "out")
    assert code == 143 and err.strip() == f"error: terminated (SIGTERM): nothing was written to {root / 'out'}"
    assert tree_hash(root) == before


def test_code_files_need_copy_code_and_copies_get_sane_modes(root, capsys):
    base = root / "cp" / "base"
    (base / "modeling_tiny.py").write_text("import os  # would run with trust_remote_code\n")
    (base / "tokenizer.json").chmod(0o4755)  # setuid + executable in the source
    code, _, err = fuse(capsys, *merge_args(root))
    assert code == 0, err
    assert "note: not copied: modeling_tiny.py (code; pass --copy-code to copy it)" in err
    assert not (root / "out" / "modeling_tiny.py").exists()
    assert stat.S_IMODE((root / "out" / "tokenizer.json").stat().st_mode) == 0o644
    code, _, err = fuse(capsys, *merge_args(root, "--copy-code", out=root / "out2"))
    assert code == 0 and (root / "out2" / "modeling_tiny.py").exists() and "not copied" not in err


def test_config_that_is_not_json_is_copied_with_a_warning_without_dtype(root, capsys):
    (root / "cp" / "base" / "config.json").write_text("{not json")
    code, _, err = fuse(capsys, *merge_args(root))
    assert code == 0
    assert f"warning: {root / 'cp' / 'base' / 'config.json'} is not valid JSON; copied as it is" in err


def test_links_inside_the_folder_and_into_the_hf_blob_store_are_followed(root, capsys):
    repo = root / "hub" / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / "rev").mkdir(parents=True)
    shutil.copy(root / "cp" / "ft2" / "model.safetensors", repo / "blobs" / "0123abcd")
    (repo / "snapshots" / "rev" / "model.safetensors").symlink_to("../../blobs/0123abcd")
    inner = root / "cp" / "ft2" / "weights"
    inner.mkdir()
    (root / "cp" / "ft2" / "model.safetensors").rename(inner / "real.safetensors")
    (root / "cp" / "ft2" / "model.safetensors").symlink_to("weights/real.safetensors")
    code, _, err = fuse(capsys, *merge_args(root, "--allow-duplicates", models=("cp/ft2", "hub/models--org--tiny/snapshots/rev")))
    assert code == 0, err
    merged = load_file(str(root / "out" / "model.safetensors"))
    assert torch.allclose(merged["w"], tiny(2)["w"])  # the mean of two copies of ft2 (delta 1.0 ⇒ ft2)


def test_minibench_cache_build_disk_full_is_one_line_and_leaves_nothing(tmp_path):
    cache = pytest.importorskip("fusion_minibench.cache")
    from fusion_minibench.recipe import Recipe

    from fusion_core.errors import FuseError

    def builder(recipe, out, show_progress=True):
        (out / "partial.bin").write_bytes(bytes(100))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(FuseError) as info:
        cache.ensure_built(Recipe(), str(tmp_path), show_progress=False, builder=builder)
    line = str(info.value)
    assert "\n" not in line and "No space left on device" in line and "free space there" in line
    assert [p for p in tmp_path.rglob("*") if ".building-" in p.name] == []


def test_sigterm_during_fuse_run_leaves_no_output(root, capsys, monkeypatch):
    import signal

    from fusion_core.builtins.methods import Dummy

    def killed(self, pool, ctx):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the run")

    monkeypatch.setattr(Dummy, "run", killed)
    before, previous = tree_hash(root), signal.getsignal(signal.SIGTERM)
    code, _, err = fuse(capsys, *run_args(root, str(root / "runout")))
    assert code == 143 and err.strip() == "terminated (SIGTERM); no partial output was kept"
    assert tree_hash(root) == before
    assert signal.getsignal(signal.SIGTERM) == previous  # the handler is gone afterwards


def test_two_concurrent_merges_to_one_new_output_never_replace_each_other(root):
    """Two real `fuse merge` processes, started together, to the same new output: exactly one wins."""
    import subprocess

    pytest.importorskip("fusion_merging")
    out = root / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    argv = [sys.executable, "-m", "fusion_core", "merge", "task_arithmetic", "--base", str(root / "cp" / "base"),
            "--model", str(root / "cp" / "ft2"), "-o", str(out), "-q", "--set"]  # fmt: skip
    procs = [subprocess.Popen([*argv, f"scaling_factor={s}"], env=env, stderr=subprocess.PIPE, text=True) for s in (0.25, 0.75)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    loser = next(err for code, err in results if code == 2).strip().splitlines()
    assert len(loser) == 1 and ("already exists" in loser[0] or "appeared while this run was writing" in loser[0])
    winner = 0.25 if results[0][0] == 0 else 0.75
    base, ft2 = tiny(0), tiny(2)
    merged = load_file(str(out / "model.safetensors"))
    assert torch.allclose(merged["w"], base["w"] + winner * (ft2["w"] - base["w"]))  # the winner's output, whole
    assert [p.name for p in root.iterdir() if ".fuse-" in p.name] == []


def test_extract_lora_and_moe_refuse_an_output_holding_their_inputs_before_any_work(root):
    """`fuse extract-lora` and `fuse moe` (fusion-merging) go through the same output guard."""
    extract_lora = pytest.importorskip("fusion_merging.extract_lora")
    moe = pytest.importorskip("fusion_merging.moe")
    pytest.importorskip("transformers")
    from fusion_core.errors import FuseError

    before = tree_hash(root)
    cp = root / "cp"
    with pytest.raises(FuseError, match=r"holds the input"):
        extract_lora.extract(str(cp / "base"), str(cp / "ft2"), str(cp), rank=2, overwrite=True)
    config = {"where": "moe.yml", "base_model": str(cp / "base"), "experts": [{"source_model": str(cp / "ft2")}], "shared_experts": []}
    with pytest.raises(FuseError, match=r"is the input"):
        moe.build(config, str(cp / "ft2"), overwrite=True)
    assert tree_hash(root) == before
