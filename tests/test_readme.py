"""The README's "Use it from Python" snippets, run as they stand, in order, in one namespace,
from a folder that holds the repository's models/ and a photo folder; what they print is
checked against what the README says."""

import contextlib
import io
import os
import re

import pytest
import skimage.data
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def snippets() -> list[str]:
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text.split("## Use it from Python", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_the_snippets_run_and_say_what_the_readme_says(tmp_path, monkeypatch):
    code = snippets()
    assert len(code) == 4
    os.symlink(os.path.join(ROOT, "models"), tmp_path / "models")
    (tmp_path / "my_photos").mkdir()
    for name in ("astronaut", "coffee", "rocket", "chelsea"):
        Image.fromarray(getattr(skimage.data, name)()).save(tmp_path / "my_photos" / f"{name}.png")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for snippet in code:
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile(snippet, "README.md", "exec"), namespace)
    record = namespace["result"]["record"]
    assert record["psnr"] == pytest.approx(25.44, abs=0.3)  # as the README says
    assert record["sampler"] == {"eta": 1.0, "zeta": 4.0, "K": 3, "steps": 25}
    x0 = namespace["x0"]  # DMAP's samples, the last of the loop
    assert x0[:, 0].mean().item() == pytest.approx(0.5, abs=0.02)
    assert x0[:, 1].std().item() == pytest.approx(1.0, rel=0.1)
    assert os.path.basename(namespace["checkpoint"]) == "checkpoint-20"
    assert namespace["with_cse"]["record"]["cse"]["step"] == 20
    report = namespace["report"]
    assert report["n"] == 1  # the reference folder's example.png and the restoration
    assert report["metrics"]["psnr"]["mean"] == pytest.approx(record["psnr"], abs=5e-4)
