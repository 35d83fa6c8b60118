"""How the project reads and copies: imports point one way (stages -> common, rewards; toy ->
common, rewards; never back), common.py imports no project module, and a stage plus common.py
(+ rewards.py) is a complete copy set."""
import ast
import os
import shutil
import subprocess
import sys

from conftest import ROOT

MODULES = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))
STAGES = {"teacher_grpo", "cold_start", "opd", "evaluate"}


def project_imports(module):
    """The project modules that `module` imports anywhere in its file (top level or in a function)."""
    with open(os.path.join(ROOT, module + ".py")) as f:
        tree = ast.parse(f.read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & set(MODULES) - {module}


def test_imports_point_one_way():
    graph = {m: project_imports(m) for m in MODULES}
    assert graph["common"] == set()
    assert "toy" not in graph["rewards"] and graph["rewards"] <= {"common"}
    for stage in STAGES:
        assert not graph[stage] & STAGES, f"{stage} imports another stage: {graph[stage] & STAGES}"
        assert "toy" not in graph[stage] and "bench" not in graph[stage]
    visiting, done = set(), set()

    def visit(m, path):
        assert m not in visiting, f"import cycle: {' -> '.join(path + [m])}"
        if m in done:
            return
        visiting.add(m)
        for n in sorted(graph[m]):
            visit(n, path + [m])
        visiting.discard(m)
        done.add(m)

    for m in MODULES:
        visit(m, [])


def test_importing_common_loads_no_project_module():
    code = ("import sys; import common; "
            f"print(sorted(set(sys.modules) & set({MODULES!r}) - {{'common'}}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_a_stage_and_common_are_a_complete_copy(tmp_path):
    """What a reader copies into their own project runs there: opd.py + common.py, and the GRPO
    stage with rewards.py."""
    for files in (["opd.py", "common.py"], ["teacher_grpo.py", "common.py", "rewards.py"]):
        folder = tmp_path / files[0][:-3]
        folder.mkdir()
        for f in files:
            shutil.copy(os.path.join(ROOT, f), folder)
        run = subprocess.run([sys.executable, files[0], "--help"], capture_output=True, text=True, cwd=folder)
        assert run.returncode == 0, run.stderr[-1000:]
