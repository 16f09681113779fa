"""The README stays true: its generated tables match the declarations, its plugin example runs."""
from __future__ import annotations

import re

import onnx
from conftest import ROOT

from onnxopt.cli import main, passes_markdown
from onnxopt.registry import all_passes

README = (ROOT / "README.md").read_text()


def block(name: str) -> str:
    match = re.search(rf"<!-- {name}:begin -->\n(.*?)\n<!-- {name}:end -->", README, re.S)
    assert match, f"README has no {name} block"
    return match.group(1)


def test_readme_pass_table_is_generated_from_the_declarations():
    built_in = {name: cls for name, cls in all_passes().items() if cls.__module__.startswith("onnxopt.passes.")}
    assert block("passes") == passes_markdown(built_in), "rerun: onnxopt passes --markdown"


def test_readme_settings_table_is_generated_from_the_declarations(capsys):
    assert main(["settings", "--markdown"]) == 0
    assert block("settings") == capsys.readouterr().out.strip(), "rerun: onnxopt settings --markdown"


def test_readme_plugin_example_works(tmp_path, capsys):
    code = re.search(r"```python\n(# mypass\.py\n.*?)```", README, re.S).group(1)
    (tmp_path / "mypass.py").write_text(code)
    out = tmp_path / "out.onnx"
    rc = main([str(ROOT / "models" / "demo.onnx"), "--plugin", str(tmp_path / "mypass.py"), "-p", "fold,stamp:text=hello",
               "--shape", "image=1x1x8x8", "--runs", "0", "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert onnx.load(str(out)).graph.doc_string == "hello"
    assert main(["passes", "--plugin", str(tmp_path / "mypass.py")]) == 0
    assert "stamp: Write a doc string on the graph." in capsys.readouterr().out


def test_readme_links_resolve():
    for target in re.findall(r"\]\(([^)#:]+)\)", README):
        assert (ROOT / target).exists(), target
