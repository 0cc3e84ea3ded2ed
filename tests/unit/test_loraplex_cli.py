"""The `loraplex` command: subcommands listed, store listing shows valid and refused adapters."""

import json
import subprocess
import sys

from loraplex.server.cli import main


def test_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "loraplex.server.cli", "--help"], capture_output=True, text=True, check=True).stdout
    assert "base" in out and "adapters" in out


def test_adapters_list_reports_plain_peft_folders_and_refusals(tmp_path, capsys):
    store = tmp_path / "adapters"
    good = store / "plain-peft"
    good.mkdir(parents=True)
    (good / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}))
    dora = store / "dora"
    dora.mkdir()
    (dora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"], "use_dora": True}))
    (store / ".tmp-x-123").mkdir()
    (store / ".tmp-x-123" / "adapter_config.json").write_text("{}")
    assert main(["adapters", "list", "--adapters-dir", str(store), "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"plain-peft", "dora"}
    assert rows["plain-peft"]["status"] == "ok" and rows["plain-peft"]["rank"] == 4
    assert rows["dora"]["status"] == "invalid" and "use_dora=true" in rows["dora"]["error"]


def test_adapters_show_unknown_name_is_exit_2(tmp_path, capsys):
    assert main(["adapters", "show", "nope", "--adapters-dir", str(tmp_path)]) == 2
    assert "adapter 'nope' not found" in capsys.readouterr().err
    assert main(["adapters", "show", "../etc", "--adapters-dir", str(tmp_path)]) == 2
    assert "is invalid" in capsys.readouterr().err
