"""``kt-bench teachers fetch``: the published teachers are downloaded from a local HTTP server,
placed only when whole, matching the manifest's (or the first fetch's recorded) SHA-256 and
loadable; ``run --teachers-dir`` refuses a file that differs from its recorded hash."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from kt_bench.core.errors import ConfigError, KtBenchError
from kt_bench.sweep import teacher_fetch
from kt_bench.sweep.cells import check_published_teachers, expand
from kt_bench.sweep.config import load_grid
from kt_bench.training.reference_checkpoints import (
    PUBLISHED_TEACHERS,
    reference_name,
    reference_teacher_path,
)

from .conftest import run_cli, write_tiny_grid
from .test_commands_start_light import heavy_modules, imported_modules

CKPT = "ckpt_epoch_240.pth"


def checkpoint_bytes(seed: int, **extra) -> bytes:
    """A small checkpoint as RepDistiller saves one: ``{'model': state_dict, ...}``."""
    torch.manual_seed(seed)
    return torch_bytes({"model": {"conv.weight": torch.randn(4, 3, 3, 3),
                                  "fc.bias": torch.zeros(4)}, "epoch": 240, **extra})


def torch_bytes(obj) -> bytes:
    """``obj`` as ``torch.save`` writes it."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def sha(data: bytes) -> str:
    """The SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


class Server:
    """A local HTTP server of ``files`` (URL path -> bytes); a path in ``cut`` is sent with a
    Content-Length 1000 bytes above its size, then the connection closes."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.cut: set[str] = set()
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                """Serve a file of ``files`` (cut short when in ``cut``), else 404."""
                path = self.path.removeprefix("/mirror/")
                server.requests.append(path)
                if path not in server.files:
                    self.send_error(404)
                    return
                body = server.files[path]
                self.send_response(200)
                extra = 1000 if path in server.cut else 0
                self.send_header("Content-Length", str(len(body) + extra))
                self.end_headers()
                self.wfile.write(body)
                self.close_connection = True

            def log_message(self, *args) -> None:
                """Log nothing (the test output stays clean)."""

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/mirror"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    def close(self) -> None:
        """Stop serving and free the port."""
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    """A running :class:`Server` (reached directly, whatever proxy the environment names)."""
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")
    srv = Server()
    yield srv
    srv.close()


def use_manifest(monkeypatch, tmp_path: Path, rows: list[dict]) -> None:
    """Make ``rows`` (model, and optionally size/sha256) the manifest the command reads."""
    teachers = []
    for row in rows:
        path = f"{row['model']}_vanilla/{CKPT}"
        teachers.append({"model": row["model"], "r_name": row["model"],
                         "url": f"http://unused.invalid/{path}", "path": path,
                         "size": row.get("size"), "sha256": row.get("sha256")})
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"note": "test", "teachers": teachers}))
    monkeypatch.setattr(teacher_fetch, "MANIFEST", manifest)


def fetch(capsys, server: Server, folder: Path, *more: str) -> tuple[int, str, str]:
    """``kt-bench teachers fetch --to folder --base-url <server>`` and more arguments."""
    return run_cli(capsys, "teachers", "fetch", "--to", str(folder), "--base-url", server.url,
                   *more)


def leftovers(folder: Path) -> list[Path]:
    """Temporary download files left anywhere under ``folder``."""
    return sorted(folder.rglob("*.part"))


def test_a_good_teacher_is_placed_with_its_hash_recorded_then_skipped(
        tmp_path, capsys, monkeypatch, server):
    body = checkpoint_bytes(0)
    server.files[f"good_vanilla/{CKPT}"] = body
    use_manifest(monkeypatch, tmp_path, [{"model": "good", "size": len(body),
                                          "sha256": sha(body)}])
    folder = tmp_path / "teachers"
    code, out, err = fetch(capsys, server, folder)
    assert (code, err) == (0, "")
    placed = folder / "good_vanilla" / CKPT
    assert placed.read_bytes() == body
    assert teacher_fetch.read_record(placed) == sha(body)
    record = (folder / "good_vanilla" / f"{CKPT}.sha256").read_text()
    assert record.endswith(f"{sha(body)}  {CKPT}\n")  # sha256sum -c format
    assert "matches the manifest's SHA-256" in out and "1 fetched" in out
    assert leftovers(folder) == []
    code, out, _ = fetch(capsys, server, folder)
    assert code == 0 and "present and verified: skipped" in out
    assert server.requests == [f"good_vanilla/{CKPT}"]  # the second fetch downloaded nothing
    code, out, _ = run_cli(capsys, "teachers", "list", "--to", str(folder))
    assert code == 0 and "verified (the manifest)" in out


def test_a_file_that_differs_from_the_manifest_is_not_placed(
        tmp_path, capsys, monkeypatch, server):
    server.files[f"bad_vanilla/{CKPT}"] = checkpoint_bytes(1)
    expected = sha(checkpoint_bytes(2))
    use_manifest(monkeypatch, tmp_path, [{"model": "bad", "sha256": expected}])
    folder = tmp_path / "teachers"
    code, out, err = fetch(capsys, server, folder)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"kt-bench: error: {server.url}/bad_vanilla/{CKPT} differs from the "
                          f"manifest's SHA-256 ({sha(checkpoint_bytes(1))[:12]}..., expected "
                          f"{expected[:12]}...): altered; nothing was placed at "
                          f"{folder / 'bad_vanilla' / CKPT}")
    assert not (folder / "bad_vanilla" / CKPT).exists()
    assert not (folder / "bad_vanilla" / f"{CKPT}.sha256").exists()
    assert leftovers(folder) == []


def test_a_download_cut_short_is_not_placed(tmp_path, capsys, monkeypatch, server):
    body = checkpoint_bytes(3)
    server.files[f"cut_vanilla/{CKPT}"] = body
    server.cut.add(f"cut_vanilla/{CKPT}")
    use_manifest(monkeypatch, tmp_path, [{"model": "cut"}])
    folder = tmp_path / "teachers"
    code, _, err = fetch(capsys, server, folder)
    assert code == 2 and err.count("\n") == 1
    assert (f"{server.url}/cut_vanilla/{CKPT} was cut short: {len(body):,} of "
            f"{len(body) + 1000:,} bytes arrived; nothing was placed") in err
    assert not (folder / "cut_vanilla" / CKPT).exists()
    assert leftovers(folder) == []


def test_without_a_manifest_hash_the_first_fetch_is_trusted_and_later_ones_checked(
        tmp_path, capsys, monkeypatch, server):
    first = checkpoint_bytes(4)
    server.files[f"tofu_vanilla/{CKPT}"] = first
    use_manifest(monkeypatch, tmp_path, [{"model": "tofu"}])
    folder = tmp_path / "teachers"
    placed = folder / "tofu_vanilla" / CKPT
    code, out, _ = fetch(capsys, server, folder)
    assert code == 0 and "trust on first use" in out
    assert teacher_fetch.read_record(placed) == sha(first)
    assert fetch(capsys, server, folder)[0] == 0  # verified against the record: skipped
    assert len(server.requests) == 1

    # the published file changes: a new download no longer matches the recorded hash
    server.files[f"tofu_vanilla/{CKPT}"] = checkpoint_bytes(5)
    code, _, err = fetch(capsys, server, folder, "--force")
    assert code == 2 and err.count("\n") == 1
    assert (f"differs from the SHA-256 recorded in {placed}.sha256 "
            f"({sha(checkpoint_bytes(5))[:12]}..., expected {sha(first)[:12]}...)") in err
    assert placed.read_bytes() == first and teacher_fetch.read_record(placed) == sha(first)
    assert leftovers(folder) == []

    # the placed file changes: fetch and list say so
    placed.write_bytes(checkpoint_bytes(6))
    code, _, err = fetch(capsys, server, folder)
    assert code == 2 and f"{placed} differs from the SHA-256 recorded in" in err
    assert "it was altered after it was fetched" in err
    _, out, _ = run_cli(capsys, "teachers", "list", "--to", str(folder))
    assert "ALTERED (differs from the recorded hash)" in out
    # --force fetches the published file again, which still matches the record
    server.files[f"tofu_vanilla/{CKPT}"] = first
    assert fetch(capsys, server, folder, "--force")[0] == 0
    assert placed.read_bytes() == first


@pytest.mark.parametrize("body, reason", [
    (checkpoint_bytes(7)[:-200], "is no loadable checkpoint"),
    (torch_bytes([1, 2]), "loads but holds no state dict of tensors"),
    (checkpoint_bytes(7, opt=argparse.Namespace(lr=0.05)),
     "cannot be loaded safely: it needs argparse.Namespace to load"),
], ids=["truncated", "list", "code"])
def test_a_file_that_is_no_safe_checkpoint_is_not_placed(
        tmp_path, capsys, monkeypatch, server, body, reason):
    server.files[f"odd_vanilla/{CKPT}"] = body
    use_manifest(monkeypatch, tmp_path, [{"model": "odd"}])
    folder = tmp_path / "teachers"
    code, _, err = fetch(capsys, server, folder)
    assert code == 2 and err.count("\n") == 1 and reason in err, err
    assert not (folder / "odd_vanilla" / CKPT).exists() and leftovers(folder) == []


def test_network_failures_are_one_line_naming_the_url(tmp_path, capsys, monkeypatch, server):
    use_manifest(monkeypatch, tmp_path, [{"model": "gone"}])
    code, _, err = fetch(capsys, server, tmp_path / "t")
    assert code == 2
    assert err == (f"kt-bench: error: {server.url}/gone_vanilla/{CKPT}: the server answered "
                   "HTTP 404 Not Found\n")
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code, _, err = run_cli(capsys, "teachers", "fetch", "--to", str(tmp_path / "t"),
                           "--base-url", f"http://127.0.0.1:{port}")
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"kt-bench: error: cannot reach http://127.0.0.1:{port}/gone_vanilla/"
                          f"{CKPT}: ")
    assert leftovers(tmp_path / "t") == []


def test_only_fetches_the_named_teachers_and_refuses_unknown_ones(
        tmp_path, capsys, monkeypatch, server):
    for name in ("a", "b"):
        server.files[f"{name}_vanilla/{CKPT}"] = checkpoint_bytes(8)
    use_manifest(monkeypatch, tmp_path, [{"model": "a"}, {"model": "b"}])
    folder = tmp_path / "teachers"
    assert fetch(capsys, server, folder, "--only", "b")[0] == 0
    assert server.requests == [f"b_vanilla/{CKPT}"]
    code, _, err = fetch(capsys, server, folder, "--only", "c")
    assert (code, err) == (2, "kt-bench: error: --only: no published teacher 'c'; known: a, b\n")
    code, _, err = run_cli(capsys, "teachers", "fetch", "--base-url", "ftp://host/x")
    assert code == 2 and "--base-url takes an http://, https://, file:// URL" in err


def test_run_teachers_dir_refuses_a_teacher_that_differs_from_its_record(tmp_path, capsys):
    grid = write_tiny_grid(tmp_path)
    folder = tmp_path / "teachers"
    (folder / "resnet8_vanilla").mkdir(parents=True)
    teacher = folder / "resnet8_vanilla" / CKPT
    teacher.write_bytes(checkpoint_bytes(9))
    record = folder / "resnet8_vanilla" / f"{CKPT}.sha256"

    def cells():
        return expand(load_grid(str(grid)), teachers_dir=str(folder))

    check_published_teachers(cells(), str(folder))  # no record: nothing to check against
    record.write_text(f"# fetched\n{sha(checkpoint_bytes(9))}  {CKPT}\n")
    check_published_teachers(cells(), str(folder))  # matches its record
    record.write_text(f"{sha(checkpoint_bytes(10))}  {CKPT}\n")
    with pytest.raises(KtBenchError, match=f"--teachers-dir {folder}: {teacher} differs from "
                                           "the SHA-256 recorded beside it"):
        check_published_teachers(cells(), str(folder))
    code, _, err = run_cli(capsys, "run", "--grid", str(grid), "--dry-run", "--teachers-dir",
                           str(folder))
    assert code == 2 and err.count("\n") == 1 and f"{teacher} differs from the SHA-256" in err
    record.write_text("not a record\n")
    with pytest.raises(KtBenchError, match="is no SHA-256 record of ckpt_epoch_240.pth"):
        check_published_teachers(cells(), str(folder))


def test_the_shipped_manifest_lists_repdistillers_teachers_without_invented_hashes():
    data = json.loads(teacher_fetch.MANIFEST.read_text())
    teachers = teacher_fetch.load_manifest()
    assert sorted(t.r_name for t in teachers) == sorted(PUBLISHED_TEACHERS)
    for t in teachers:
        assert reference_name(t.model) == t.r_name
        assert Path(t.path) == reference_teacher_path(".", t.model)
        # R:scripts/fetch_pretrained_teachers.sh
        assert t.url == f"http://shape2prog.csail.mit.edu/repo/{t.r_name}_vanilla/{CKPT}"
        assert t.url == t.url_from(data["base_url"])
    if any(t.sha256 is None for t in teachers):
        assert "null" in data["note"] and "trust on first use" in data["note"]


@pytest.mark.parametrize("change, message", [
    ({"path": "../outside/x.pth"}, "'path' must be relative"),
    ({"sha256": "abc"}, "'sha256' must be 64 lowercase hex digits or null"),
    ({"size": -1}, "'size' must be a number of bytes or null"),
], ids=["path", "sha256", "size"])
def test_a_malformed_manifest_is_one_line(tmp_path, change, message):
    row = {"model": "m", "r_name": "m", "url": "http://h/m", "path": "m/x.pth", "size": None,
           "sha256": None, **change}
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"teachers": [row]}))
    with pytest.raises(ConfigError, match=f"teacher manifest {path}: teacher 0 \\(m\\): "
                                          f"{message}"):
        teacher_fetch.load_manifest(path)


def test_teachers_list_imports_no_torch(tmp_path):
    proc, names = imported_modules("teachers", "list", "--to", str(tmp_path))
    assert heavy_modules(names) == []
    assert proc.stdout.count("missing") == len(PUBLISHED_TEACHERS)
