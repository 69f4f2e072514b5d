"""Config precedence (flags > MNIST_* > defaults) and usage errors (exit 2), without training."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, assert_one_line_error, run_here, run_mnist
from mnist_pipeline import cli, settings as table
from mnist_pipeline.commands import stages


def settings(argv, env):
    parser = cli.build_parser()
    args = parser.parse_args(argv)
    try:
        return table.resolve(args.command, vars(args), env)[0]
    except ValueError as exc:
        parser.error(str(exc))


def test_defaults_when_nothing_is_set():
    values = settings(["infer"], {})
    assert values["root"] == Path("mnist-volume")
    assert values["mirror"] is None
    assert (values["wait"], values["threshold"], values["count"], values["seed"]) == (30.0, 0.95, 5, None)
    assert settings(["train"], {})["epochs"] == 1


def test_serve_host_and_port_flags_over_env_over_defaults():
    assert (settings(["serve"], {})["host"], settings(["serve"], {})["port"]) == ("127.0.0.1", 8000)
    env = {"MNIST_HOST": "0.0.0.0", "MNIST_PORT": "9000"}
    assert (settings(["serve"], env)["host"], settings(["serve"], env)["port"]) == ("0.0.0.0", 9000)
    assert settings(["serve", "--port", "9100", "--host", "::1"], env)["port"] == 9100
    assert settings(["serve", "--port", "9100", "--host", "::1"], env)["host"] == "::1"


def test_env_overrides_default_and_flag_overrides_env():
    env = {"MNIST_EPOCHS": "3", "MNIST_ROOT": "/env/root", "MNIST_FRESH": "yes", "MNIST_WAIT": "7.5"}
    assert settings(["train"], env)["epochs"] == 3
    assert settings(["train"], env)["root"] == Path("/env/root")
    assert settings(["train"], env)["fresh"] is True
    assert settings(["train", "--epochs", "2", "--root", "/flag"], env)["epochs"] == 2
    assert settings(["train", "--epochs", "2", "--root", "/flag"], env)["root"] == Path("/flag")
    assert settings(["evaluate", "--wait", "0"], env)["wait"] == 0.0


@pytest.mark.parametrize(
    "argv, env, fragment",
    [
        (["train", "--epochs", "-1"], {}, "--epochs"),
        (["train", "--epochs", "0"], {}, "--epochs"),
        (["train", "--epochs", "two"], {}, "not a number"),
        (["train"], {"MNIST_EPOCHS": "-1"}, "MNIST_EPOCHS='-1'"),
        (["train"], {"MNIST_BATCH_SIZE": "big"}, "MNIST_BATCH_SIZE='big'"),
        (["train"], {"MNIST_FRESH": "maybe"}, "MNIST_FRESH='maybe'"),
        (["evaluate"], {"MNIST_WAIT": "-5"}, "MNIST_WAIT"),
        (["infer", "--threshold", "1.5"], {}, "--threshold"),
        (["infer"], {"MNIST_COUNT": "0"}, "MNIST_COUNT"),
        (["infer"], {"MNIST_DEVICE": "tpu"}, "MNIST_DEVICE"),
        (["train"], {"MNIST_MIRROR": "  "}, "MNIST_MIRROR"),
        (["serve", "--port", "70000"], {}, "--port"),
        (["serve"], {"MNIST_PORT": "http"}, "MNIST_PORT='http'"),
        (["serve"], {"MNIST_HOST": "local host"}, "MNIST_HOST"),
        (["serve", "--runtime", "tpu"], {}, "--runtime"),
        (["serve"], {"MNIST_RUNTIME": "onnxruntime"}, "MNIST_RUNTIME='onnxruntime'"),
    ],
)
def test_bad_values_are_usage_errors(argv, env, fragment, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv, env=env)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


def test_env_values_that_do_not_apply_to_the_command_are_ignored():
    # MNIST_EPOCHS belongs to train; a broken one must not stop infer
    assert settings(["infer"], {"MNIST_EPOCHS": "x"})["count"] == 5


def test_evaluate_takes_no_seed_it_would_ignore(capsys):
    """Scoring draws nothing at random: a --seed there would be accepted and silently do nothing."""
    with pytest.raises(SystemExit) as exit_info:
        settings(["evaluate", "--seed", "3"], {})
    assert exit_info.value.code == 2 and "--seed" in capsys.readouterr().err
    assert settings(["evaluate"], {"MNIST_SEED": "3"})["wait"] == 30  # Compose passes it to every service


def test_epochs_minus_one_from_the_shell_exits_2_without_traceback(tmp_path):
    result = run_mnist("train", "--root", str(tmp_path), "--epochs", "-1", fresh=True)  # python -m, as typed
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--epochs" in result.stderr
    assert not (tmp_path / "model").exists()


def test_every_subcommand_help_names_flags_and_env_twins():
    for command in ("train", "evaluate", "infer", "pipeline"):
        result = run_here(command, "--help")
        assert result.returncode == 0
        for setting in taken_by(command):
            assert setting.flag in result.stdout and setting.env in result.stdout.replace("\n", " ")


def test_device_cuda_without_gpu_is_a_clear_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = run_here("train", "--root", str(tmp_path), "--device", "cuda")
    assert_one_line_error(result, 1, "cuda")


def taken_by(command: str) -> list:
    return [table.SETTINGS[name] for name in table.COMMAND_SETTINGS[command]]


def all_settings(*commands: str) -> dict:
    """The settings of `commands` (all commands when none is named) by their MNIST_* name."""
    return {s.env: s for command in commands or cli.COMMANDS for s in taken_by(command)}


def test_compose_passes_on_every_setting_of_the_cli():
    import yaml

    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    batch = all_settings("train", "evaluate", "infer", "pipeline", "report")
    for name in ("train", "evaluate", "infer"):
        assert set(compose["services"][name]["environment"]) == set(batch), name
    assert set(compose["services"]["serve"]["environment"]) == set(all_settings("serve"))
    assert set(compose["services"]["export"]["environment"]) == set(all_settings("export"))


def test_the_settings_doc_table_matches_the_cli():
    """docs/settings.md lists every setting once, with the CLI's flag, default and commands."""
    rows = re.findall(r"^\| `(--[a-z-]+)[^`]*` \| `(MNIST_[A-Z_]+)` \| ([^|]+) \| ([^|]+) \|",
                      (REPO / "docs" / "settings.md").read_text(), re.MULTILINE)
    settings = all_settings()
    assert sorted(env for _, env, _, _ in rows) == sorted(settings)
    for flag, env, default, commands in rows:
        setting = settings[env]
        assert flag == setting.flag, env
        taking = {command for command in cli.COMMANDS if setting in taken_by(command)}
        listed = set(cli.COMMANDS) if commands.strip() == "all" else set(commands.replace(" ", "").split(","))
        assert listed == taking, env
        if isinstance(setting.default, bool) or setting.default is None or isinstance(setting.default, Path):
            continue
        shown = f"{setting.default:g}" if isinstance(setting.default, float) else str(setting.default)
        assert re.match(rf"`?{re.escape(shown)}\b", default.strip()), (env, default)


def test_the_cli_defaults_build_each_stage_config_with_its_own_defaults():
    """Nothing set: every command's configs are the dataclasses' defaults (each flag reads the right field)."""
    values = {command: settings([command, "x.png"] if command == "predict" else [command], {})
              for command in cli.COMMANDS}
    root = table.DEFAULT_ROOT
    assert values["train"]["root"] == root
    for v in (values["train"], values["pipeline"]):
        assert stages.train_config(v, frozenset()) == table.TrainConfig(root=root)
    for v in (values["evaluate"], values["pipeline"]):
        assert stages.evaluate_config({**v, "started": 0.0}) == table.EvaluateConfig(root=root, started=0.0)
    for v in (values["infer"], values["pipeline"]):
        assert stages.infer_config({**v, "started": 0.0}) == table.InferConfig(root=root, started=0.0)
    assert table.ServeConfig(**values["serve"]) == table.ServeConfig(root=root)
    assert values["predict"].pop("json") is False  # (how predict prints: not the stage's)
    assert values["evaluate"]["export"] == values["pipeline"]["export"] == "auto"  # (the tests' env says never)
    assert table.PredictConfig(images=(), **values["predict"]) == table.PredictConfig(root=root, images=())


def _literal(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value is not None


def literal_setting_defaults(source: str) -> list:
    """The literal defaults (None aside) written into `Setting(flag, parse, default, ...)` calls in `source`."""
    return [call.args[2].value for call in ast.walk(ast.parse(source))
            if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "Setting" and _literal(call.args[2])]


def fields_with_literal_defaults(source: str) -> list:
    """The names of the class fields in `source` whose default is a literal (None aside), once per class."""
    return [field.target.id for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ClassDef)
            for field in node.body if isinstance(field, ast.AnnAssign) and _literal(field.value)]


def test_each_default_is_written_once_in_settings_py():
    """The settings table takes its defaults from the config classes, each written in a single field or constant."""
    assert literal_setting_defaults(Path(table.__file__).read_text()) == []
    fields = fields_with_literal_defaults(Path(table.__file__).read_text())
    assert sorted(name for name in set(fields) if fields.count(name) > 1) == []
    assert {"epochs", "batch_size", "peak_lr", "save_every_s", "count", "host", "port"} <= set(fields)


def test_the_cli_builds_its_parser_and_answers_help_and_usage_errors_without_torch():
    """settings.py holds no torch: `mnist --help` and a bad flag answer at once, before torch's slow import."""
    code = ("import sys\nfrom mnist_pipeline import cli\n"
            "for argv in (['train', '--help'], ['infer', '--count', '0']):\n"
            "    try:\n        cli.main(argv, env={})\n    except SystemExit as exc:\n        print(exc.code)\n"
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.split()[-3:] == ["0", "2", "False"], result.stderr[-2000:]
