"""The README's worked example is the file the main job runs, and it runs."""

import pathlib
import re
import runpy

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_readme_example_is_the_example_file():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert (ROOT / "examples" / "tiled_matmul.py").read_text() in blocks


def test_readme_first_lines_give_the_two_commands():
    lines = (ROOT / "README.md").read_text().splitlines()[:10]
    assert "Run the main job:" in lines and "Run the tests:" in lines
    main_cmd = lines[lines.index("Run the main job:") + 2].strip()
    assert 'pip install -e ".[model]"' in main_cmd and "python -m gemma3 generate --prompt" in main_cmd
    test_cmd = lines[lines.index("Run the tests:") + 2].strip()
    assert (
        test_cmd.endswith("python -m pytest -q") and 'pip install -e ".[test,oracle,model,ray]"' in test_cmd
    )


def test_example_runs_and_writes_its_trace(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(ROOT / "examples" / "tiled_matmul.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "CycleReport 'tiled_matmul' on tiny" in out
    assert "trace written to tiled_matmul_trace.json" in out
    assert (tmp_path / "tiled_matmul_trace.json").stat().st_size > 1000
    err = float(re.search(r"max \|out - a @ b\| = ([0-9.e-]+)", out).group(1))
    assert err < 0.5  # bf16 inputs and outputs of magnitude ~30: a few bf16 ulps


def test_second_example_prints_the_ablation_the_readme_shows(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(ROOT / "examples" / "residual_rmsnorm.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "CycleReport 'residual_rmsnorm' on atom" in out
    assert float(re.search(r"max \|y - reference\| = ([0-9.e-]+)", out).group(1)) < 0.1  # bf16 ulps
    readme = (ROOT / "README.md").read_text()
    table = re.search(r"```\n(variant \(1024 x 2560 on atom\).*?)```", readme, re.S).group(1)
    assert table.strip() in out  # the README's numbers are the example's
    rows = {line[:36].strip(): line.split() for line in table.strip().splitlines()[1:]}
    assert rows["all engines, own queues, depth 2"][-1] == "dram"
    assert rows["one engine"][-1] == rows["every engine on queues 0 and 1"][-1] == "dma.q0"
