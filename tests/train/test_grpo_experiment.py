"""The GRPO experiment's data splits and statistics (benchmarks/grpo_experiment.py; its runs are not
repeated here: they take CPU minutes per seed)."""
import importlib.util
import os

import pytest

from peftkern.models import tasks

_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "grpo_experiment.py")


@pytest.fixture(scope="module")
def experiment():
    spec = importlib.util.spec_from_file_location("grpo_experiment", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_disjoint_split_keeps_stages_and_held_out_apart(experiment):
    sft, rl, held = experiment.stage_items("disjoint", tasks.SKILLS)
    q = lambda items: {x for x, _, _ in items}  # noqa: E731
    assert len(held) == 60 and len(rl) == 1600 and len(sft) > 1500
    assert not q(sft) & q(rl) and not q(sft) & q(held) and not q(rl) & q(held)
    # every skill on both sides, about half of its distinct questions each
    for skill in tasks.SKILLS:
        a = sum(tasks.skill_of(x) == skill for x in q(sft))
        b = sum(tasks.skill_of(x) == skill for x in q(rl))
        assert a > 10 and abs(a - b) <= 1, (skill, a, b)


def test_demo_split_is_the_demos(experiment):
    sft, rl, held = experiment.stage_items("demo", tasks.SKILLS)
    train, demo_held = tasks.split(4000, 60, 0)
    assert held == demo_held and sft == train[:2400] and rl == train[2400:]


def test_rl_skills_filter(experiment):
    _, rl, _ = experiment.stage_items("disjoint", ("upper", "reverse"))
    assert rl and {tasks.skill_of(x) for x, _, _ in rl} == {"upper", "reverse"}


def test_sign_test(experiment):
    assert experiment.sign_test(0, 0) == 1.0
    assert experiment.sign_test(3, 4) == 1.0
    assert experiment.sign_test(10, 2) == pytest.approx(2 * 79 / 4096)  # (1 + 12 + 66) / 2**12, both tails
    assert experiment.sign_test(5, 0) == pytest.approx(2 / 32)


def test_flips_count_each_way_and_per_skill(experiment):
    items = [("Write 'cat' in capitals.", "CAT", ""), ("Reverse 'cat'.", "tac", ""), ("What is 1 + 2?", "3", "")]
    before, after = [True, False, False], [False, True, True]
    assert experiment._flips(before, after, items) == [2, 1]
    assert experiment._flips(before, after, items, "upper") == [0, 1]
    assert experiment._flips(before, after, items, "add") == [1, 0]
