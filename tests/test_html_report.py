"""`report` / `recover --report` (dfrec_jax/html_report.py): one self-contained HTML page for a
recover output folder, sorted by forgery probability, with trace rankings; rendered in headless
Chromium in the slow test."""

import html.parser
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from dfrec_jax import html_report, recover, trace
from tests import lfw, tiny


class _Page(html.parser.HTMLParser):
    """The page's rows (data-probability), image sources, scripts with a src, and links."""

    def __init__(self):
        super().__init__()
        self.probabilities, self.images, self.external = [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr" and "data-probability" in attrs:
            self.probabilities.append(float(attrs["data-probability"]))
        if tag == "img":
            self.images.append(attrs["src"])
        if tag in ("script", "link", "iframe") and ("src" in attrs or "href" in attrs):
            self.external.append((tag, attrs))


def _parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    return page


@pytest.fixture(scope="module")
def folder(tiny_run, tmp_path_factory):
    """A recover output of 4 real faces (one named with HTML characters) and its trace."""
    root = tmp_path_factory.mktemp("report")
    inputs = root / "inputs"
    inputs.mkdir()
    faces = np.round(lfw.real_faces(4, tiny.IMAGE_SIZE) * 255).astype(np.uint8)
    for name, face in zip(("a", "b", "c", "x<y&z"), faces):
        Image.fromarray(face).save(inputs / f"{name}.png")
    out = root / "out"
    nets = tiny.tiny_identity_nets()
    assert recover.run([str(inputs)], str(out), workdir=tiny_run, nets=nets) == 0
    gallery = root / "gallery"
    for person, face in zip(("alice", "bob"), faces[:2]):
        (gallery / person).mkdir(parents=True)
        Image.fromarray(face).save(gallery / person / "1.png")
    assert trace.run(str(gallery), str(out), nets=nets) == 0
    return out


@pytest.fixture
def varied(folder, tmp_path):
    """A copy of `folder` whose records carry distinct forgery probabilities (the tiny random
    model gives ~0.5 to every face, which would make any order look sorted)."""
    copy = tmp_path / "varied"
    shutil.copytree(folder, copy)
    for stem, probability in zip(("a", "b", "c", "x<y&z"), (0.3, 0.9, 0.1, 0.6)):
        path = copy / f"{stem}.json"
        record = json.loads(path.read_text())
        record["forgery_probability"] = probability
        path.write_text(json.dumps(record))
    return copy


def test_rows_follow_the_forgery_probability(varied):
    page = _parse(open(html_report.write(str(varied))).read())
    assert page.probabilities == [0.9, 0.6, 0.3, 0.1]
    assert page.images[0] == "b_panel.png"


def test_page_lists_every_record_sorted_with_local_images(folder):
    path = html_report.write(str(folder))
    assert path == str(folder / "report.html")
    text = open(path).read()
    page = _parse(text)
    records = [json.loads((folder / f"{s}.json").read_text()) for s in ("a", "b", "c", "x<y&z")]
    assert sorted(page.probabilities, reverse=True) == page.probabilities
    assert sorted(page.probabilities) == sorted(r["forgery_probability"] for r in records)
    assert page.external == []  # nothing loaded from elsewhere
    assert "http://" not in text and "https://" not in text
    for src in page.images:  # every image is a file recover wrote, relative to the page
        assert not os.path.isabs(src) and (folder / src).is_file()
    assert len(page.images) == 4
    assert "x&lt;y&amp;z" in text and "x<y&z<" not in text  # names are escaped
    for record in records:
        assert record["input_sha256"] in text
    # trace's best match is named next to each face.
    assert "alice (" in text and "bob (" in text
    assert html_report.write(str(folder)) == path and open(path).read() == text  # same bytes


def test_page_elsewhere_links_back_and_bad_folders_fail(folder, tmp_path):
    elsewhere = tmp_path / "pages" / "r.html"
    elsewhere.parent.mkdir()
    html_report.write(str(folder), str(elsewhere))
    for src in _parse(elsewhere.read_text()).images:
        assert (elsewhere.parent / src).resolve().is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.json").write_text("{}")
    with pytest.raises(ValueError, match="no recover evidence records"):
        html_report.write(str(empty))
    with pytest.raises(FileNotFoundError, match="not found"):
        html_report.write(str(tmp_path / "missing"))


@pytest.mark.slow  # headless Chromium (Debian's chromium package)
def test_page_renders_in_headless_chromium(varied, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "the rendering test needs Chromium: apt-get install chromium"
    page = html_report.write(str(varied))
    shot = tmp_path / "shot.png"
    done = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
         "--enable-logging=stderr", "--v=0", f"--screenshot={shot}", "--window-size=1200,900",
         f"file://{page}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if "CONSOLE" in line]
    assert console == [], console
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.std() > 10  # not blank
    # The panels were drawn: their red-tinted forged-pixel column shows reddish pixels.
    red = (pixels[..., 0] > pixels[..., 1] + 60) & (pixels[..., 0] > pixels[..., 2] + 60)
    assert red.sum() > 100

    # The sort button's script, run by Chromium: one click turns the order ascending.
    clicked = tmp_path / "clicked.html"
    text = open(page).read().replace("</body>", "<script>sortByProbability();</script></body>")
    clicked.write_text(text)
    done = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
         "--dump-dom", f"file://{clicked}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    order = _parse(done.stdout).probabilities
    assert order == [0.1, 0.3, 0.6, 0.9], done.stderr[-2000:]
