"""`ctmeta download` / `ctmeta train --download` (`ctmeta.tasks.download`).

No test reaches the internet: a local HTTP server serves archives written in
the official layouts (and broken ones), and the loaders must read what was
fetched. One test checks that an address nobody answers is a clear failure.
"""

import functools
import http.server
import io
import socket
import threading
import zipfile

import numpy as np
import pytest

from ctmeta import presets
from ctmeta._errors import DataError
from ctmeta.cli import main
from ctmeta.tasks import download as dl
from ctmeta.tasks.ratings import load_jester, load_movielens


def _ml100k_zip_bytes() -> bytes:
    """ml-100k.zip's layout; 130 users with 40 distinct items of 120 each (enough for 100 test users)."""
    rng = np.random.default_rng(0)
    rows = [(u, i, rng.integers(1, 6)) for u in range(1, 131) for i in rng.choice(np.arange(1, 121), 40, replace=False)]
    lines = "".join(f"{u}\t{i}\t{r}\t{874965758 + n}\n" for n, (u, i, r) in enumerate(rows))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("ml-100k/u.data", lines)
        z.writestr("ml-100k/README", "MovieLens-100K (fixture)")
    return buf.getvalue()


def _jester_zip_bytes(tmp_path) -> tuple[bytes, np.ndarray]:
    """jester_dataset_1_1.zip as distributed: jester-data-1.xls, first column the rating count."""
    xlwt = pytest.importorskip("xlwt")
    rng = np.random.default_rng(1)
    values = np.round(rng.uniform(-10, 10, (12, 100)), 2)
    for row in values:
        row[rng.choice(100, 30, replace=False)] = 99
    book = xlwt.Workbook()
    sheet = book.add_sheet("jester-data-1")
    for r, row in enumerate(np.column_stack([(values != 99).sum(1), values])):
        for c, v in enumerate(row):
            sheet.write(r, c, float(v))
    xls = tmp_path / "made.xls"
    book.save(str(xls))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("jester-data-1.xls", xls.read_bytes())
    return buf.getvalue(), values


class _Server:
    """Serves `files` (path -> bytes) on 127.0.0.1; other paths are 404.
    `lie_about_length` paths announce more bytes than they send."""

    def __init__(self, files: dict[str, bytes], lie_about_length: tuple[str, ...] = ()):
        self.files, self.lie = files, lie_about_length
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                server.requests.append(self.path)
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404, "Not Found")
                    return
                self.send_response(200)
                extra = 1000 if self.path in server.lie else 0
                self.send_header("Content-Length", str(len(body) + extra))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path_factory):
    jester, values = _jester_zip_bytes(tmp_path_factory.mktemp("fixture"))
    truncated = _ml100k_zip_bytes()[:-40]
    srv = _Server(
        {"/ml-100k.zip": _ml100k_zip_bytes(), "/jester_dataset_1_1.zip": jester, "/truncated.zip": truncated,
         "/page.html": b"<html>moved</html>", "/short.zip": _ml100k_zip_bytes()},
        lie_about_length=("/short.zip",),
    )
    srv.jester_values = values
    yield srv
    srv.close()


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


def test_fetches_into_the_folder_the_loader_reads_and_keeps_what_is_there(server, tmp_path):
    folder = tmp_path / "data" / "movielens"  # created on demand
    sources = (dl.Source(f"{server.url}/ml-100k.zip", "ml-100k.zip"),)
    lines = []
    paths = dl.download("movielens", folder, sources=sources, log=lines.append)
    assert paths == [folder / "ml-100k.zip"] and _leftovers(folder) == ["ml-100k.zip"]
    assert (folder / "ml-100k.zip").read_bytes() == server.files["/ml-100k.zip"]
    assert len(load_movielens(folder).ratings) == 130 * 40
    # Again: nothing is fetched.
    dl.download("movielens", folder, sources=sources, log=lines.append)
    assert server.requests == ["/ml-100k.zip"] and "already there" in lines[-1]


def test_jester_spreadsheet_is_copied_out_of_the_official_zip(server, tmp_path):
    sources = (dl.Source(f"{server.url}/jester_dataset_1_1.zip", "jester-data-1.xls", member="jester-data-1.xls"),)
    dl.download("jester", tmp_path, sources=sources, log=lambda _: None)
    assert _leftovers(tmp_path) == ["jester-data-1.xls"]  # the archive itself is not kept
    table = load_jester(tmp_path)
    assert len(np.unique(table.users)) == 12
    assert np.count_nonzero(server.jester_values != 99) == len(table.ratings)


@pytest.mark.parametrize(
    "path, message",
    [
        ("/truncated.zip", "did not give a readable zip"),
        ("/page.html", "did not give a readable zip"),
        ("/missing.zip", "HTTP 404"),
        ("/short.zip", "stopped after"),
    ],
)
def test_a_failed_download_says_so_and_leaves_nothing(server, tmp_path, path, message):
    sources = (dl.Source(f"{server.url}{path}", "ml-100k.zip"),)
    with pytest.raises(dl.DownloadError, match=message) as err:
        dl.download("movielens", tmp_path, sources=sources, log=lambda _: None)
    assert f"{server.url}{path}" in str(err.value)
    assert _leftovers(tmp_path) == []  # no partial file a loader could take for data


def test_member_missing_from_the_archive(server, tmp_path):
    sources = (dl.Source(f"{server.url}/ml-100k.zip", "jester-data-1.xls", member="jester-data-1.xls"),)
    with pytest.raises(dl.DownloadError, match="expected one jester-data-1.xls"):
        dl.download("jester", tmp_path, sources=sources, log=lambda _: None)
    assert _leftovers(tmp_path) == []


def test_nobody_answering_is_a_download_error(tmp_path):
    with socket.socket() as s:  # a port that was free a moment ago: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sources = (dl.Source(f"http://127.0.0.1:{port}/ml-100k.zip", "ml-100k.zip"),)
    with pytest.raises(dl.DownloadError, match="failed"):
        dl.download("movielens", tmp_path, sources=sources, timeout=5, log=lambda _: None)


def test_what_cannot_be_downloaded_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="ImageNet"):
        dl.download("miniimagenet", tmp_path)
    with pytest.raises(DataError, match="unknown benchmark"):
        dl.download("imagenet", tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="not a directory|cannot create"):
        dl.download("movielens", tmp_path / "file", sources=(dl.Source("http://127.0.0.1:9/x.zip", "x.zip"),))


def test_the_official_addresses_name_the_files_the_loaders_look_for():
    assert {b for b, p in presets.BENCHMARKS.items() if p.data_subdir} == set(dl.SOURCES)
    names = {b: [s.filename for s in srcs] for b, srcs in dl.SOURCES.items() if srcs}
    assert names == {"movielens": ["ml-100k.zip"], "movielens-1m": ["ml-1m.zip"], "jester": ["jester-data-1.xls"],
                     "omniglot": ["images_background.zip", "images_evaluation.zip"]}
    assert all(s.url.startswith("https://") for srcs in dl.SOURCES.values() if srcs for s in srcs)


def test_cli_download_and_exit_codes(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(dl.SOURCES, "movielens", (dl.Source(f"{server.url}/ml-100k.zip", "ml-100k.zip"),))
    # --data-dir is the data root (as for train, reproduce and bench): the files go to <root>/movielens ...
    assert main(["download", "movielens", "--data-dir", str(tmp_path / "ml"), "--quiet"]) == 0
    assert (tmp_path / "ml" / "movielens" / "ml-100k.zip").is_file()
    assert not (tmp_path / "ml" / "ml-100k.zip").exists()
    # ... and a folder named for the data set is that data set's folder.
    assert main(["download", "movielens", "--data-dir", str(tmp_path / "own" / "movielens"), "--quiet"]) == 0
    assert (tmp_path / "own" / "movielens" / "ml-100k.zip").is_file()
    # A failed download: runtime failure, status 1, one line naming the address.
    monkeypatch.setitem(dl.SOURCES, "movielens", (dl.Source(f"{server.url}/missing.zip", "ml-100k.zip"),))
    capsys.readouterr()
    assert main(["download", "movielens", "--data-dir", str(tmp_path / "other"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "HTTP 404" in err and f"{server.url}/missing.zip" in err
    # Cannot be downloaded, or nothing to download: input errors, status 2.
    assert main(["download", "miniimagenet", "--data-dir", str(tmp_path / "mini"), "--quiet"]) == 2
    assert "ImageNet" in capsys.readouterr().err
    assert main(["train", "--download", "--meta-iterations", "1", "--quiet"]) == 2
    assert "synthetic" in capsys.readouterr().err


def test_train_download_fetches_then_trains(server, tmp_path, monkeypatch):
    import dataclasses
    import json

    monkeypatch.setitem(dl.SOURCES, "movielens", (dl.Source(f"{server.url}/ml-100k.zip", "ml-100k.zip"),))
    p = presets.BENCHMARKS["movielens"]
    monkeypatch.setitem(presets.BENCHMARKS, "movielens", dataclasses.replace(p, eval_steps=(0, 2), eval_every=2))
    monkeypatch.setattr(presets, "default_data_dir", functools.partial(lambda root, preset: root / "movielens",
                                                                        tmp_path / "data"))
    # Without --download, the missing data directory is an input error; nothing is fetched.
    argv = ["train", "--benchmark", "movielens", "--method", "maml", "--steps", "2", "--meta-iterations", "1",
            "--quiet"]
    assert main(argv + ["--out", str(tmp_path / "run0")]) == 2 and server.requests == []
    assert main(argv + ["--out", str(tmp_path / "run"), "--download"]) == 0
    assert server.requests == ["/ml-100k.zip"]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data_dir"] == str((tmp_path / "data" / "movielens").resolve())
