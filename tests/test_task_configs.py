"""Every discovered task config, the published protocol values (shared/LRA_FACTS.md §2), their readers, and
`lra-data` option errors."""
from __future__ import annotations

import pytest
from hydra.utils import instantiate

from lra.config import CONF_DIR, compose, task_names
from lra.data import cli

# task: (batch, warm-up, steps, eval every, max_len, head, classes, vocab)
PROTOCOL = {
    "text": (32, 8000, 20000, 500, 4096, "pooled", 2, 257),
    "retrieval": (32, 800, 30000, 300, 4096, "dual", 2, 257),
    "image": (256, 175, 35000, 175, 1024, "pooled", 10, 256),
    "pathfinder": (256, 312, 62400, 312, 1024, "pooled", 2, 256),
    "pathx": (256, 312, 62400, 312, 16384, "pooled", 2, 256),
}


@pytest.mark.parametrize("task", task_names())
def test_every_task_config_builds_a_consistent_reader(task):
    """Every discovered task: named by its file, a reader that imports and agrees with the yaml."""
    cfg = compose([f"task={task}"])
    assert cfg.task.name == task
    reader = instantiate(cfg.task.reader)
    assert (reader.max_len, reader.num_classes) == (cfg.task.max_len, cfg.task.num_classes)
    assert reader.num_classes >= 2 and reader.vocab_size >= 2
    assert reader.pair == (cfg.task.head == "dual")
    assert cfg.model.max_len >= cfg.task.max_len
    source = (CONF_DIR / "task" / f"{task}.yaml").read_text().splitlines()
    assert any(line.startswith("# ") and "@package" not in line for line in source[:4]), \
        f"conf/task/{task}.yaml: say where its hyperparameters come from in a comment at the top"


def test_published_rows_name_discovered_tasks():
    assert set(PROTOCOL) <= set(task_names())


@pytest.mark.parametrize("task", sorted(PROTOCOL))
def test_protocol_values_and_reader(task):
    cfg = compose([f"task={task}"])
    batch, warmup, steps, every, max_len, head, classes, vocab = PROTOCOL[task]
    assert (cfg.data.batch_size, cfg.scheduler.warmup_steps, cfg.trainer.max_steps, cfg.trainer.val_check_interval,
            cfg.task.max_len, cfg.task.head, cfg.task.num_classes) == (batch, warmup, steps, every, max_len, head, classes)
    reader = instantiate(cfg.task.reader)
    assert (reader.name, reader.max_len, reader.num_classes, reader.vocab_size) == (task, max_len, classes, vocab)
    assert reader.pair == (task == "retrieval")
    assert cfg.model.max_len == max_len


def test_pathfinder_variants_are_parameters():
    pf = instantiate(compose(["task=pathfinder"]).task.reader)
    px = instantiate(compose(["task=pathx"]).task.reader)
    assert type(pf) is type(px)
    assert (pf.resolution, px.resolution) == (32, 128) and pf.difficulty == px.difficulty == "curv_contour_length_14"
    easy = instantiate(compose(["task=pathfinder", "task.reader.difficulty=easy"]).task.reader)
    assert easy.difficulty == "curv_baseline" and easy.cache_key() != pf.cache_key()


@pytest.mark.parametrize("argv, match", [
    (["task.reader.text_len=5000"], "text_len=5000 must be in 1..task.max_len"),
    (["task.reader.source_format=zip"], "source_format 'zip'"),
])
def test_bad_option_is_one_clear_line(tmp_path, capsys, argv, match):
    assert cli.main(["prepare", "text", "--source", str(tmp_path), "--data-dir", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err
