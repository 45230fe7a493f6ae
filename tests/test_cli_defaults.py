"""The CLI's defaults are the configuration dataclasses' defaults.

The parser copies them by hand: building it must not import torch and transformers (4 s on a 2-core CPU, for every
`padrec --help`), and the dataclasses live in modules that do. These tests keep every copy equal to its source, and
the renamed flags' old spellings working."""

from __future__ import annotations

import argparse

import pytest

from padrec.cli import DRAFT_KINDS, build_parser, main


def _defaults(command: str) -> dict:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: a.default for a in sub.choices[command]._actions if a.default is not argparse.SUPPRESS}


def _check(command: str, config, names: dict[str, str]) -> None:
    got = _defaults(command)
    for flag_dest, field in names.items():
        assert got[flag_dest] == getattr(config, field), f"{command} --{flag_dest}: {got[flag_dest]!r} vs {field}"


def test_train_target_defaults():
    from padrec.training.target_trainer import TrainConfig

    _check("train-target", TrainConfig(), {"preset": "preset", "epochs": "epochs", "batch_size": "batch_size",
                                           "lr": "lr", "patience": "patience", "seed": "seed",
                                           "time_budget_min": "time_budget_min", "base_model": "base_model",
                                           "dropout": "dropout", "select_by": "select_by"})
    from padrec.training.target_trainer import SELECT_BY

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    select = next(a for a in sub.choices["train-target"]._actions if a.dest == "select_by")
    assert tuple(select.choices) == SELECT_BY


def test_train_draft_defaults_and_kinds():
    from padrec.drafts.kinds import KINDS
    from padrec.drafts.train import DraftTrainConfig

    assert DRAFT_KINDS == KINDS
    _check("train-draft", DraftTrainConfig(), {
        "kind": "kind", "epochs": "epochs", "lr": "lr", "batch_size": "batch_size", "seed": "seed",
        "base": "padrec_base", "steps": "hass_steps", "top_k": "hass_topk", "align_weight": "align_weight",
        "align_top_k": "align_topk", "list_valid_users": "list_valid_users", "list_train_users": "list_train_users",
        "init_from": "init_from", "time_budget_min": "time_budget_min"})


def test_tokenize_and_rank_defaults():
    from padrec.evaluation.evaluate import RankConfig
    from padrec.tokenizer.build import TokenizerConfig

    _check("tokenize", TokenizerConfig(), {"method": "method", "levels": "levels", "codebook_size": "codebook_size",
                                           "vocab": "layout", "seed": "seed"})
    for command in ("evaluate", "recommend"):
        _check(command, RankConfig(), {"beam_size": "beam_size", "n_items": "n_items", "temperature": "temperature",
                                       "top_k": "top_k", "top_p": "top_p", "batch_size": "batch_size"})


def test_serve_defaults():
    from padrec.serving import ServeSettings

    _check("serve", ServeSettings(), {"max_history": "max_history", "max_k": "max_k", "max_batch": "max_batch",
                                      "threads": "threads", "max_body_bytes": "max_body_bytes"})


@pytest.mark.parametrize("old,new,dest,value", [("--draft", "--kind", "kind", "hass"),
                                                ("--topk", "--top-k", "top_k", "8"),
                                                ("--align-topk", "--align-top-k", "align_top_k", "5")])
def test_old_train_draft_spellings_still_work(capsys, old, new, dest, value):
    args = build_parser().parse_args(["train-draft", "--run", "r", old, value])
    assert str(getattr(args, dest)) == value
    assert f"{old} is deprecated; use {new}" in capsys.readouterr().err
    assert f"[{old} " not in build_parser()._subparsers._group_actions[0].choices["train-draft"].format_usage()


def test_old_train_seed_spelling(capsys):
    args = build_parser().parse_args(["train-target", "--run", "r", "--train-seed", "3"])
    assert args.seed == 3 and "--train-seed is deprecated; use --seed" in capsys.readouterr().err
    assert build_parser().parse_args(["train-target", "--run", "r"]).seed == 0


def test_unknown_kind_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train-draft", "--run", "r", "--kind", "medusa"])
    assert e.value.code == 2 and "invalid choice: 'medusa'" in capsys.readouterr().err


def test_demo_and_zoo_pack_defaults():
    from types import SimpleNamespace

    from padrec.demo import ZOO_BENCH_USERS, ZOO_DEMO_USERS
    from padrec.zoo_pack import PackConfig

    _check("demo", SimpleNamespace(users=ZOO_DEMO_USERS, bench_users=ZOO_BENCH_USERS),
           {"users": "users", "bench_users": "bench_users"})
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    zoo = next(a for a in sub.choices["zoo"]._actions if isinstance(a, argparse._SubParsersAction))
    pack = {a.dest: a.default for a in zoo.choices["pack"]._actions}
    assert pack["dtype"] == PackConfig(name="x").dtype and pack["check_users"] == PackConfig(name="x").check_users
