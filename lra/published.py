"""Published LRA test accuracies (percent) that `lra-leaderboard` compares our runs with.

Numbers are the papers' own result tables (test %, 5-task average as printed; collected in the project's
LRA_FACTS.md §3). Each model is mapped to our backend's name, the file name of its conf/attention/<name>.yaml:
the LRA paper's "Transformer" is our `softmax`, "Local Attention" `local`, "Sparse Trans." `sparse`,
"Sinkhorn Trans." `sinkhorn`, "Linear Trans." `linear`. A row may say what the paper's model actually ran
(`ran`) and where its printed average is not the mean of its five numbers (`avg_note`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The five tasks both papers average over; Path-X is reported separately.
AVG_TASKS: tuple[str, ...] = ("listops", "text", "retrieval", "image", "pathfinder")


@dataclass(frozen=True)
class PublishedRow:
    """One model's row in a paper's table."""

    backend: str  # our backend's name (conf/attention/<backend>.yaml)
    paper_name: str  # how the table shows the model's row
    acc: dict[str, float]  # task -> test accuracy (%), only the tasks the paper reports
    avg: float  # the 5-task average as printed in the paper
    failed: tuple[str, ...] = ()  # tasks the paper reports as FAIL (chance level)
    ran: str = ""  # what the paper's model actually computed, where its name alone would mislead
    ran_options: dict[str, object] = field(default_factory=dict)  # the same, as our backend's options
    avg_note: str = ""  # why `avg` is not the mean of `acc`, when it is not


@dataclass(frozen=True)
class PublishedSource:
    """One paper's table of results."""

    key: str  # short id used in CSV/JSON column names
    title: str
    citation: str
    protocol: str  # the protocol (our preset) that follows this paper's training setup
    rows: tuple[PublishedRow, ...] = field(default_factory=tuple)

    def row(self, backend: str) -> PublishedRow | None:
        return next((r for r in self.rows if r.backend == backend), None)


def _acc(listops: float, text: float, retrieval: float, image: float, pathfinder: float) -> dict[str, float]:
    return dict(zip(AVG_TASKS, (listops, text, retrieval, image, pathfinder)))


# Xiong et al. 2021, the LRA results table (and its Reformer row); LRA_FACTS.md §3. What their Performer ran:
# LRA_FACTS.md §5 (the ReLU setting was ignored by the library they called).
NYSTROMFORMER_PAPER = PublishedSource(
    key="nystromformer_paper",
    title="Nyströmformer paper",
    citation="Xiong et al., Nyströmformer: A Nyström-based Algorithm for Approximating Self-Attention, "
    "AAAI 2021 (arXiv 2102.03902), LRA results table (their PyTorch runs; Path-X not reported)",
    protocol="nystromformer",
    rows=(
        PublishedRow("softmax", "softmax Transformer", _acc(37.10, 65.02, 79.35, 38.20, 74.16), 58.77),
        PublishedRow("nystrom", "Nyströmformer", _acc(37.15, 65.52, 79.56, 41.58, 70.94), 58.95),
        PublishedRow("linformer", "Linformer", _acc(37.25, 55.91, 79.37, 37.84, 67.60), 55.59),
        PublishedRow("performer", "Performer", _acc(18.80, 63.81, 78.62, 37.07, 69.87), 53.63,
                     ran="exponential (softmax-kernel) random features with logits scaled by 1/Dh, not "
                     "1/sqrt(Dh), and padded keys in the normaliser: their code asked for the ReLU kernel, but "
                     "the library ignored that setting",
                     ran_options={"kernel": "softmax", "logit_scale": "1/Dh", "pad_in_normaliser": True}),
        PublishedRow("reformer", "Reformer (2 hashes)", _acc(19.05, 64.88, 78.64, 43.29, 69.36), 55.04,
                     ran="LSH attention with 2 hashes", ran_options={"n_hashes": 2}),
    ),
)

# Tay et al. 2020/2021, Table 1 (LRA_FACTS.md §3); every model failed Path-X (chance level).
_X = ("pathx",)
LRA_PAPER = PublishedSource(
    key="lra_paper",
    title="LRA paper",
    citation="Tay et al., Long Range Arena: A Benchmark for Efficient Transformers, ICLR 2021 "
    "(arXiv 2011.04006), Table 1 (JAX runs; every model failed Path-X)",
    protocol="lra",
    rows=(
        PublishedRow("softmax", "Transformer", _acc(36.37, 64.27, 57.46, 42.44, 71.40), 54.39, _X),
        PublishedRow("local", "Local Attention", _acc(15.82, 52.98, 53.39, 41.46, 66.63), 46.06, _X),
        PublishedRow("sparse", "Sparse Trans.", _acc(17.07, 63.58, 59.59, 44.24, 71.71), 51.24, _X),
        PublishedRow("longformer", "Longformer", _acc(35.63, 62.85, 56.89, 42.22, 69.71), 53.46, _X),
        PublishedRow("linformer", "Linformer", _acc(35.70, 53.94, 52.27, 38.56, 76.34), 51.36, _X),
        PublishedRow("reformer", "Reformer", _acc(37.27, 56.10, 53.40, 38.07, 68.50), 50.67, _X),
        PublishedRow("sinkhorn", "Sinkhorn Trans.", _acc(33.67, 61.20, 53.83, 41.23, 67.45), 51.39, _X,
                     avg_note="the paper prints 51.39; its five numbers average to 51.48"),
        PublishedRow("synthesizer", "Synthesizer", _acc(36.99, 61.68, 54.67, 41.61, 69.45), 52.88, _X),
        PublishedRow("bigbird", "BigBird", _acc(36.05, 64.02, 59.29, 40.83, 74.87), 55.01, _X),
        PublishedRow("linear", "Linear Trans.", _acc(16.13, 65.90, 53.09, 42.34, 75.30), 50.55, _X),
        PublishedRow("performer", "Performer", _acc(18.01, 65.40, 53.82, 42.77, 77.05), 51.41, _X),
    ),
)

SOURCES: tuple[PublishedSource, ...] = (NYSTROMFORMER_PAPER, LRA_PAPER)


def published_backends() -> list[str]:
    """Every backend some paper has a row for, in the papers' order (the tables' row order)."""
    out: list[str] = []
    for source in SOURCES:
        out += [r.backend for r in source.rows if r.backend not in out]
    return out


def protocol_backends(protocol: str) -> list[str]:
    """The backends some paper following `protocol` has a row for, in its table's order (the default
    backends of `make reproduce-<protocol>`). An unknown protocol raises ValueError naming the known ones."""
    sources = [s for s in SOURCES if s.protocol == protocol]
    if not sources:
        known = sorted({s.protocol for s in SOURCES})
        raise ValueError(f"no published table follows protocol '{protocol}'; the papers in lra/published.py follow "
                         f"{', '.join(known)} (a protocol of conf/protocols/ without a published table has no "
                         "default backends: give BACKENDS=\"a b\").")
    out: list[str] = []
    for source in sources:
        out += [r.backend for r in source.rows if r.backend not in out]
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m lra.published PROTOCOL`: the backends with a published row for PROTOCOL, one line."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m lra.published",
                                description="Print the backends a protocol's published table has rows for.")
    p.add_argument("protocol", help="a protocol of conf/protocols/ (e.g. lra, nystromformer)")
    args = p.parse_args(argv)
    try:
        print(" ".join(protocol_backends(args.protocol)))
    except ValueError as err:
        print(f"python -m lra.published: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
