"""What every fusemt entry point does around Hydra: ``--version``, one-line errors for bad overrides, Ctrl-C.

Hydra reports a misspelt key or an unknown option in 5-8 lines that suggest ``+key=...``, and only
once a job starts. Before handing over to Hydra, the command line is composed here once per
distinct value of every swept override and checked with the same typed config the run uses, so a
mistake fails at start-up in one line naming the valid keys or options (exit code 2).
"""

from __future__ import annotations

import os
import sys
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version

from omegaconf import DictConfig, OmegaConf

from decoding.errors import FusemtError, fail
from runners.config import CONF_DIR, build_run_config, register_schemas

# Hydra's own flags; everything else on the command line is an override.
_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                     "--config-dir", "-cd", "--experimental-rerun", "--shell-completion"}
_INFO_FLAGS = {"--help", "-h", "--hydra-help", "--info", "-i", "--shell-completion", "-sc"}


def fusemt_version() -> str:
    try:
        return version("fusemt")
    except PackageNotFoundError:  # run from a checkout that was not installed
        return "unknown"


RUN_ID = "FUSEMT_RUN_ID"


def register_resolvers() -> None:
    """``${fusemt_run_id:}``: <date>/<time with microseconds>-<pid> of the launching process.

    It keeps the output folders of runs started in the same second apart, and it is fixed once,
    in the environment: launcher workers (joblib, submitit, Ray) re-resolve the Hydra config in
    their own processes and must find the same sweep folder.
    """
    os.environ.setdefault(RUN_ID, datetime.now().strftime("%Y-%m-%d/%H-%M-%S-%f") + f"-{os.getpid()}")
    if not OmegaConf.has_resolver("fusemt_run_id"):
        OmegaConf.register_new_resolver("fusemt_run_id", lambda: os.environ[RUN_ID])
    # ``${fusemt_repo:}``: the checkout's root, so presets can name files shipped beside conf/.
    if not OmegaConf.has_resolver("fusemt_repo"):
        OmegaConf.register_new_resolver("fusemt_repo", lambda: str(CONF_DIR.parent))


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(Hydra flags with their values, overrides)."""
    flags, overrides, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in _FLAGS_WITH_VALUE and i + 1 < len(argv):
            flags += argv[i : i + 2]
            i += 2
            continue
        (flags if arg.startswith("-") else overrides).append(arg)
        i += 1
    return flags, overrides


def job_override_lists(overrides: list[str]) -> list[list[str]]:
    """Override lists covering every value of every swept override (others at their first value)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    sweeps = {i: [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]
              for i, o in enumerate(parsed) if o.is_sweep_override()}
    base = [sweeps[i][0] if i in sweeps else o.input_line for i, o in enumerate(parsed)]
    lists = [base]
    for i, values in sweeps.items():
        lists += [base[:i] + [v] + base[i + 1:] for v in values[1:]]
    return lists


def _node_keys(cfg: DictConfig, dotted: str) -> tuple[str, list[str]]:
    """The deepest existing node on the path of ``dotted`` and its keys."""
    parts, node, where = dotted.lstrip("+~").split("."), cfg, "the config"
    for part in parts[:-1]:
        child = node.get(part) if isinstance(node, DictConfig) else None
        if not isinstance(child, DictConfig):
            break
        node, where = child, part if where == "the config" else f"{where}.{part}"
    return where, sorted(str(k) for k in node.keys())


def _methods_with(key: str) -> str:
    """For an unknown ``decoding.<option>``: which methods have that option (empty when none does)."""
    from dataclasses import fields

    from decoding.methods import DECODERS, decoder_class

    option = key.lstrip("+~").removeprefix("decoding.")
    if not key.lstrip("+~").startswith("decoding.") or "." in option:
        return ""
    decoder_class("greedy")  # imports the built-in methods
    having = sorted(name for name, cls in DECODERS.items() if option in {f.name for f in fields(cls.Config)})
    return f"; {option} is an option of decoding={','.join(having)}" if having else ""


def explain(err: Exception, cfg_for_keys) -> str:
    """One line for a Hydra composition error."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

    if isinstance(err, MissingConfigException):
        missing = (err.missing_cfg_file or "").strip("/")
        group, _, option = missing.rpartition("/")
        options = ", ".join(o for o in (err.options or []))
        if group:
            return f"unknown option {group}={option}: choose one of {options}"
        return f"config '{missing}' not found"
    if isinstance(err, OverrideParseException):
        return f"cannot parse an override ({str(err).splitlines()[0]}): write key=value, e.g. decoding.top_k=5"
    cause = err.__cause__
    if isinstance(err, ConfigCompositionException) and cause is not None:
        key = getattr(cause, "full_key", None) or ""
        first = str(cause).splitlines()[0]
        if "not in struct" in first or ("not in '" in first and first.startswith("Key")):
            where, keys = _node_keys(cfg_for_keys(), key)
            return f"unknown key '{key}': {where} has {', '.join(keys)}{_methods_with(key)}"
        return f"bad value for '{key}': {first}"
    return str(err).strip().splitlines()[0]


def check_overrides(config_name: str, overrides: list[str], build=build_run_config) -> None:
    """Compose each job's config as Hydra will and type it; a mistake raises FusemtError (one line)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    def composed(over: list[str]) -> DictConfig:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name, overrides=over)

    try:
        job_lists = job_override_lists(overrides)
    except Exception as err:  # noqa: BLE001 - the parser's exceptions are Hydra's
        raise FusemtError(explain(err, lambda: composed([]))) from None
    for over in job_lists:
        try:
            cfg = composed(over)
        except Exception as err:  # noqa: BLE001
            raise FusemtError(explain(err, lambda: composed([]))) from None
        finally:
            GlobalHydra.instance().clear()
        if build is not None:
            build(cfg)


def run_cli(hydra_main, config_name: str, build=build_run_config) -> None:
    """Start a Hydra entry point: version, pre-checked overrides, then Hydra; Ctrl-C ends in one line."""
    argv = sys.argv[1:]
    if "--version" in argv:
        print(f"fusemt {fusemt_version()}")
        return
    register_schemas()
    register_resolvers()
    flags, overrides = split_argv(argv)
    try:
        if not set(flags) & _INFO_FLAGS:
            check_overrides(config_name, overrides, build)
        hydra_main()
    except FusemtError as err:
        fail(err)
    except KeyboardInterrupt:
        print("fusemt: interrupted: finished segments are kept; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
