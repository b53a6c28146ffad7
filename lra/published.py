"""Published LRA test accuracies (percent) that `lra-leaderboard` compares our runs with.

Numbers are the papers' own result tables (test %, 5-task average as printed). Model names are mapped to
our backend registry names: the LRA paper's "Transformer" is our `softmax`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The five tasks both papers average over; Path-X is reported separately.
AVG_TASKS: tuple[str, ...] = ("listops", "text", "retrieval", "image", "pathfinder")


@dataclass(frozen=True)
class PublishedRow:
    """One model's row in a paper's table."""

    backend: str  # our registry name
    paper_name: str  # how the table shows the model's row
    acc: dict[str, float]  # task -> test accuracy (%), only the tasks the paper reports
    avg: float  # the 5-task average as printed in the paper
    failed: tuple[str, ...] = ()  # tasks the paper reports as FAIL (chance level)


@dataclass(frozen=True)
class PublishedSource:
    """One paper's table of results."""

    key: str  # short id used in CSV/JSON column names
    title: str
    citation: str
    protocol: str  # the protocol of ours that follows this paper's training setup
    rows: tuple[PublishedRow, ...] = field(default_factory=tuple)

    def row(self, backend: str) -> PublishedRow | None:
        return next((r for r in self.rows if r.backend == backend), None)


def _acc(listops: float, text: float, retrieval: float, image: float, pathfinder: float) -> dict[str, float]:
    return dict(zip(AVG_TASKS, (listops, text, retrieval, image, pathfinder)))


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
        PublishedRow("performer", "Performer", _acc(18.80, 63.81, 78.62, 37.07, 69.87), 53.63),
    ),
)

LRA_PAPER = PublishedSource(
    key="lra_paper",
    title="LRA paper",
    citation="Tay et al., Long Range Arena: A Benchmark for Efficient Transformers, ICLR 2021 "
    "(arXiv 2011.04006), Table 1 (JAX runs; every model failed Path-X)",
    protocol="lra",
    rows=(
        PublishedRow("softmax", "Transformer", _acc(36.37, 64.27, 57.46, 42.44, 71.40), 54.39, ("pathx",)),
        PublishedRow("linformer", "Linformer", _acc(35.70, 53.94, 52.27, 38.56, 76.34), 51.36, ("pathx",)),
        PublishedRow("performer", "Performer", _acc(18.01, 65.40, 53.82, 42.77, 77.05), 51.41, ("pathx",)),
    ),
)

SOURCES: tuple[PublishedSource, ...] = (NYSTROMFORMER_PAPER, LRA_PAPER)
