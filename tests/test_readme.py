"""The README: its Python example runs as written, its links point at files that exist,
and the commands other checks rely on are still there."""

import re
import subprocess
import sys
from pathlib import Path

import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def python_example() -> str:
    """The first ```python block under the `## Python API` heading."""
    section = README.split("\n## Python API", 1)[1]
    match = re.search(r"^```python\n(.*?)^```", section, re.S | re.M)
    assert match, "no ```python block under ## Python API"
    return match.group(1)


def test_python_example_runs_as_written(tmp_path):
    code = python_example()
    assert "ms.render_clip" in code and "ms.start_live" in code
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    audio, rate = sf.read(tmp_path / "clip.wav")
    assert rate == 32000 and len(audio) == 2 * rate
    assert "(64000,) (4, 100) 32000" in out.stdout
    assert "StreamStats(" in out.stdout and "error=None" in out.stdout


def test_links_point_at_files():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for doc in docs:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", doc.read_text()):
            if "://" not in target:
                assert (doc.parent / target).exists(), f"{doc.name} links to {target}, which does not exist"
    linked = set(re.findall(r"\]\(docs/([^)]+)\)", README))
    assert linked == {p.name for p in (ROOT / "docs").glob("*.md")}, "every docs file is linked from the README"


def test_the_commands_others_rely_on_are_kept():
    assert "```\nbash scripts/test.sh\n```" in README  # .ci/run calls it
    assert ('bash scripts/setup.sh && .venv/bin/musicsteer render --model demo --prompt "flute" --duration 5 '
            '--out demo.wav') in README
    assert len(README) < 8500, f"the README is {len(README)} characters; reference material goes to docs/"
