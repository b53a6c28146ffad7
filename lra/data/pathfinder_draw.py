"""Pathfinder / Path-X image synthesis: parameters, dash patches, occupancy, snakes, markers (GENERATORS.md §2).

`render_sample(rng, params)` draws one image and returns its geometry; `pathfinder_gen` writes datasets.
Coordinates are (row, col); an angle θ points along (sin θ, cos θ). Every canvas-sized array here is
*padded* by `Geometry.pad` pixels on each side so that a dash patch can be pasted without cropping; the
occupancy map keeps its pad at 0 (commits are clipped), which reproduces the upstream crop-at-border rule.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# Per-resolution parameters (GENERATORS.md §2.2). thickness keeps its literal type: metadata prints it as given.
_TABLE: dict[int, dict] = {
    32: dict(padding=1, paddle_length=2, paddle_thickness=0.5, margins=(1,), seed_distance=7, marker_radius=1.5,
             continuity=1.0, snake_contrasts=(2.0,), paddle_contrasts=(0.75,), budget=20),
    64: dict(padding=1, paddle_length=5, paddle_thickness=1, margins=(1,), seed_distance=12, marker_radius=2.5,
             continuity=1.8, snake_contrasts=(0.8,), paddle_contrasts=(1.0,), budget=22),
    128: dict(padding=1, paddle_length=5, paddle_thickness=1.5, margins=(2, 3), seed_distance=20, marker_radius=3,
              continuity=1.8, snake_contrasts=(0.9,), paddle_contrasts=(1.0,), budget=70),
    256: dict(padding=22, paddle_length=5, paddle_thickness=2, margins=(3,), seed_distance=27, marker_radius=5,
              continuity=1.8, snake_contrasts=(1.0,), paddle_contrasts=(1.0,), budget=30),
}
#: difficulty name -> (folder name, contour length)
DIFFICULTIES: dict[str, tuple[str, int]] = {
    "baseline": ("curv_baseline", 6), "9": ("curv_contour_length_9", 9), "14": ("curv_contour_length_14", 14)}
_ALIASES = {"easy": "baseline", "6": "baseline", "intermediate": "9", "hard": "14"}
RESOLUTIONS: tuple[int, ...] = tuple(_TABLE)
OCCUPIED = 0.3  # "available" means occupancy <= 0.3 (upstream: ceil(x - 0.3) == 0)


def normalize_difficulty(difficulty: str | int) -> str:
    """Map `baseline|9|14` (or `easy|intermediate|hard|6`) to the canonical key of DIFFICULTIES."""
    key = _ALIASES.get(str(difficulty), str(difficulty))
    if key not in DIFFICULTIES:
        raise ValueError(f"unknown difficulty {difficulty!r}; valid: baseline, 9, 14")
    return key


@dataclass(frozen=True)
class PathfinderParams:
    """Everything one image needs (upstream defaults for the retrial counts and antialias scale 2)."""

    resolution: int
    contour_length: int
    distractor_length: int
    num_distractors: int
    distractor_budget: int
    padding: int
    paddle_length: int
    paddle_thickness: float
    margins: tuple[int, ...]
    seed_distance: int
    marker_radius: float
    continuity: float
    snake_contrasts: tuple[float, ...]
    paddle_contrasts: tuple[float, ...]
    aa_scale: int = 2
    max_distractor_retrial: int = 4
    max_paddle_retrial: int = 2

    def metadata_fields(self, margin: int) -> list[str]:
        """Fields 4..10 of a release metadata line (continuity .. number of paddle contrasts)."""
        return [repr(float(self.continuity)), str(self.contour_length), str(self.distractor_length),
                str(self.paddle_length), str(self.paddle_thickness), str(margin), str(len(self.paddle_contrasts))]


def make_params(resolution: int, difficulty: str | int, distractor_budget: int | None = None) -> PathfinderParams:
    """Parameters for `pathfinder<resolution>/<difficulty>`; ND = budget // DL recomputed per difficulty (§2.2)."""
    if resolution not in _TABLE:
        raise ValueError(f"unsupported resolution {resolution}; valid: {', '.join(map(str, RESOLUTIONS))}")
    row = dict(_TABLE[resolution])
    default = row.pop("budget")
    budget = int(default if distractor_budget is None else distractor_budget)
    if budget < 0:
        raise ValueError("distractor budget must be >= 0")
    cl = DIFFICULTIES[normalize_difficulty(difficulty)][1]
    dl = cl // 3
    return PathfinderParams(resolution=resolution, contour_length=cl, distractor_length=dl, num_distractors=budget // dl,
                            distractor_budget=budget, **row)


def translate(p: tuple[float, float], theta: float, d: float) -> tuple[int, int]:
    """Move `p` by `d` along θ and round both coordinates *up* (upstream's ceil)."""
    return (math.ceil(p[0] + float(d) * math.sin(theta)), math.ceil(p[1] + float(d) * math.cos(theta)))


def flip(theta: float) -> float:
    """Reverse an orientation, staying in (-π, π]."""
    return theta + math.pi if theta < 0 else theta - math.pi


def disk_offsets(radius: float) -> np.ndarray:
    """(K, 2) integer offsets with dy² + dx² <= radius² (row-major order)."""
    r = int(math.floor(radius))
    dy, dx = np.mgrid[-r:r + 1, -r:r + 1]
    keep = dy ** 2 + dx ** 2 <= radius ** 2
    return np.stack([dy[keep], dx[keep]], axis=1)


def _dilate(img: np.ndarray, radius: int) -> np.ndarray:
    """Grey dilation with a binary disk; pixels outside the array do not contribute (OpenCV semantics)."""
    h, w = img.shape
    padded = np.zeros((h + 2 * radius, w + 2 * radius), img.dtype)
    padded[radius:radius + h, radius:radius + w] = img
    out = np.zeros_like(img)
    for dy, dx in disk_offsets(radius):
        np.maximum(out, padded[radius + dy:radius + dy + h, radius + dx:radius + dx + w], out=out)
    return out


def _lanczos_8bit(img: np.ndarray, size: int) -> np.ndarray:
    """Legacy `imresize(..., 'lanczos')` of a 0/255 array: PIL "L" Lanczos (clipped to 0..255), as float / 255."""
    small = Image.fromarray(img.astype(np.uint8)).resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(small, dtype=np.float64) / 255.0


def _frozen(*arrays: np.ndarray):
    for a in arrays:
        a.flags.writeable = False
    return arrays[0] if len(arrays) == 1 else arrays


class Geometry:
    """Everything that depends only on the parameters, memoised: dash patches, seed structuring offsets,
    candidate rings. Canvas-sized arrays are padded by `pad` pixels per side (see the module docstring)."""

    def __init__(self, params: PathfinderParams) -> None:
        p = self.p = params
        if round(p.paddle_thickness * p.aa_scale) != p.paddle_thickness * p.aa_scale:
            raise ValueError("paddle_thickness * aa_scale must be an integer")
        self.pad = self.patch_radius(max(p.margins)) + 2 + max(p.margins)
        n, q = p.resolution, self.pad
        self.base_occupancy = np.zeros((n + 2 * q, n + 2 * q))
        inner = self.base_occupancy[q:q + n, q:q + n]
        inner[:p.padding, :] = inner[-p.padding:, :] = 1.0
        inner[:, :p.padding] = inner[:, -p.padding:] = 1.0
        _frozen(self.base_occupancy)

    def patch_radius(self, margin: int) -> int:
        """Half-size R = L + ceil(t) + m of a dash patch."""
        return self.p.paddle_length + math.ceil(self.p.paddle_thickness) + margin

    # ---- dashes -------------------------------------------------------------------------------------------
    @functools.cache
    def patch(self, theta: float, margin: int) -> tuple[np.ndarray, np.ndarray]:
        """(intensity, footprint), each (2R+1)² float64, for a dash starting at the patch centre along θ."""
        p, a = self.p, self.p.aa_scale
        r = self.patch_radius(margin)
        c = r * a
        head = translate((c, c), theta, p.paddle_length * a)
        line = Image.new("L", (2 * c + 1, 2 * c + 1), 0)
        ImageDraw.Draw(line).line([(c, c), (head[1], head[0])], fill=255, width=int(round(p.paddle_thickness * a)))
        big = np.asarray(line)
        return _frozen(_lanczos_8bit(big, 2 * r + 1), _lanczos_8bit(_dilate(big, margin * a), 2 * r + 1))

    @functools.cache
    def tinted(self, theta: float, margin: int, contrast: float) -> np.ndarray:
        """Dash intensity × contrast, rounded through float32 as upstream's "F" canvases store it."""
        return _frozen((self.patch(theta, margin)[0] * contrast).astype(np.float32).astype(np.float64))

    @functools.cache
    def core_offsets(self, theta: float, margin: int) -> np.ndarray:
        """Offsets d (rows of (K, 2)) such that a dash seeded at p is refused if occupancy at p + d is high.

        Upstream dilates with the footprint pixels equal to exactly 1.0, rendered into a 2(L+m)+1 window
        whose dash starts at (L+m+1, L+m+1) while OpenCV anchors at the centre: a one-pixel diagonal shift.
        """
        r, half = self.patch_radius(margin), self.p.paddle_length + margin
        d = np.argwhere(self.patch(theta, margin)[1] == 1.0) - r  # offsets from the dash start
        return _frozen(d[np.all((d >= -(half + 1)) & (d <= half - 1), axis=1)] + 1)

    @functools.cache
    def ring(self, margin: int) -> tuple[np.ndarray, np.ndarray]:
        """Candidate offsets around a pivot (lexicographically sorted (K, 2) ints) and their orientations."""
        rho = self.p.paddle_length + margin
        ang = np.arange(0, 360, 360.0 / (2 * rho * np.pi)) * np.pi / 180  # ~1 px of arc apart
        ys, xs = rho * np.sin(ang), rho * np.cos(ang)
        # int(P + s) == P + floor(s) for on-canvas points and integer P, unless s sits within rounding
        # distance of an integer without being one (never for these radii; checked here)
        for v in (ys, xs):
            assert np.all((np.abs(v - np.round(v)) > 1e-9) | (v == np.round(v))), "ring sample on a pixel edge"
        offs = np.unique(np.stack([np.floor(ys), np.floor(xs)], axis=1).astype(np.int64), axis=0)
        return _frozen(offs, np.arctan2(offs[:, 0], offs[:, 1]))

    @functools.cache
    def disk(self, margin: int) -> np.ndarray:
        """Offsets of the binary disk of radius `margin` (the occupancy dilation of §2.6)."""
        return _frozen(disk_offsets(margin))

    @functools.cache
    def candidates(self, margin: int, theta: float) -> tuple[np.ndarray, ...]:
        """Ring candidates with non-zero continuity weight max(cos(min(c·δ, π/2)), 0)² given the last θ.

        Returns (offsets (K, 2), gather (K, D) flat offsets of each candidate's dilation disk in the padded
        occupancy, orientations φ, weights, dash angles flip(φ)). Zero-weight candidates carry no probability
        mass, so dropping them leaves the sampling distribution unchanged.
        """
        offs, orient = self.ring(margin)
        delta = np.abs(orient - theta)
        delta = np.minimum(delta, 2 * np.pi - delta)
        weights = np.maximum(np.cos(np.minimum(delta * self.p.continuity, 0.5 * np.pi)), 0) ** 2
        keep = weights > 0
        offs, orient, weights = offs[keep], orient[keep], weights[keep]
        disk, width = self.disk(margin), self.p.resolution + 2 * self.pad
        gather = (offs[:, None, 0] + disk[None, :, 0]) * width + offs[:, None, 1] + disk[None, :, 1]
        return _frozen(offs, gather, orient, weights, np.array([flip(float(o)) for o in orient]))

    # ---- occupancy ----------------------------------------------------------------------------------------
    def interior(self, arr: np.ndarray) -> np.ndarray:
        """The canvas part of a padded array (a view)."""
        q, n = self.pad, self.p.resolution
        return arr[q:q + n, q:q + n]

    def region(self, start: tuple[int, int], margin: int) -> tuple[slice, slice]:
        """Slices of a padded canvas covered by the patch of a dash starting at `start`."""
        r, q = self.patch_radius(margin), self.pad
        return (slice(start[0] + q - r, start[0] + q + r + 1), slice(start[1] + q - r, start[1] + q + r + 1))

    def commit(self, occ: np.ndarray, start: tuple[int, int], theta: float, margin: int) -> None:
        """occ = max(occ, footprint), clipped to the canvas (the pad stays 0)."""
        foot = self.patch(theta, margin)[1]
        r, n, q = self.patch_radius(margin), self.p.resolution, self.pad
        r0, r1 = max(start[0] - r, 0), min(start[0] + r + 1, n)
        c0, c1 = max(start[1] - r, 0), min(start[1] + r + 1, n)
        if r0 < r1 and c0 < c1:
            view = occ[r0 + q:r1 + q, c0 + q:c1 + q]
            np.maximum(view, foot[r0 - start[0] + r:r1 - start[0] + r, c0 - start[1] + r:c1 - start[1] + r], out=view)

    @functools.cache
    def seed_hits_border(self, theta: float, margin: int) -> bool:
        """True if some canvas pixel has every structuring tap outside the canvas.

        OpenCV pads a float dilation with -FLT_MAX, so such a pixel dilates to a negative value and upstream's
        `find_available_coordinates` then reports *no* free pixel: a seed along θ always fails (faithful quirk;
        it bites when the footprint core has no pixel up-left of the dash start, e.g. thin pf32 dashes).
        """
        n = self.p.resolution
        covered = np.zeros((n, n), dtype=bool)
        for dy, dx in self.core_offsets(theta, margin):
            covered[max(-dy, 0):n - max(dy, 0), max(-dx, 0):n - max(dx, 0)] = True
        return not covered.all()

    def seed_available(self, occ: np.ndarray, theta: float, margin: int, band: int) -> np.ndarray:
        """Flat (row-major) indices of canvas pixels where a dash along θ may be seeded."""
        n, q = self.p.resolution, self.pad
        if self.seed_hits_border(theta, margin):
            return np.empty(0, dtype=np.int64)
        blocked = occ > OCCUPIED
        inner = blocked[q:q + n, q:q + n]
        inner[:band, :] = inner[-band:, :] = True
        inner[:, :band] = inner[:, -band:] = True
        forbidden = np.zeros((n, n), dtype=bool)
        for dy, dx in self.core_offsets(theta, margin):
            forbidden |= blocked[q + dy:q + dy + n, q + dx:q + dx + n]
        return np.flatnonzero(~forbidden)

    @functools.cache
    def target_seed_available(self, deg: int, margin: int) -> np.ndarray:
        """`seed_available` on the empty board with the 2·seed_distance band (it depends on θ only)."""
        return _frozen(self.seed_available(self.base_occupancy, deg * np.pi / 180, margin, 2 * self.p.seed_distance))


_GEOMETRY: dict[PathfinderParams, Geometry] = {}


def geometry(params: PathfinderParams) -> Geometry:
    """The (per-process, memoised) Geometry of `params`."""
    g = _GEOMETRY.get(params)
    if g is None:
        g = _GEOMETRY[params] = Geometry(params)
    return g


def marker(resolution: int, tip: tuple[int, int], radius: float, aa_scale: int) -> tuple[tuple[slice, slice], np.ndarray]:
    """A marker disk at `tip`: (canvas slices, float patch). Float Lanczos, no clipping (rim peaks ~1.13, §2.3).

    Only a window around the tip is resampled; it is wide enough (> Lanczos support + radius) that the result
    equals resampling the whole supersampled canvas.
    """
    k = math.ceil(radius) + 7
    r0, r1 = max(tip[0] - k, 0), min(tip[0] + k + 1, resolution)
    c0, c1 = max(tip[1] - k, 0), min(tip[1] + k + 1, resolution)
    a = aa_scale
    yy, xx = np.ogrid[r0 * a - tip[0] * a:r1 * a - tip[0] * a, c0 * a - tip[1] * a:c1 * a - tip[1] * a]
    disk = ((xx ** 2 + yy ** 2) <= (radius * a) ** 2).astype(np.float32)
    small = Image.fromarray(disk).resize((c1 - c0, r1 - r0), Image.Resampling.LANCZOS)
    return (slice(r0, r1), slice(c0, c1)), np.asarray(small, dtype=np.float64)


def to_uint8(img: np.ndarray) -> np.ndarray:
    """Legacy min-max byte scaling: floor((v - min) · 255/(max - min), clipped, + 0.5); scale 1 if flat."""
    lo, hi = float(img.min()), float(img.max())
    span = hi - lo if hi != lo else 1.0
    return (((img - lo) * (255.0 / span)).clip(0, 255) + 0.5).astype(np.uint8)


# ---- snakes (§2.5-2.6) ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Dash:
    """One paddle: drawn from `start` along `theta` for paddle_length px, at `contrast`."""

    start: tuple[int, int]
    theta: float
    contrast: float

    def end(self, length: float) -> tuple[float, float]:
        return (self.start[0] + length * math.sin(self.theta), self.start[1] + length * math.cos(self.theta))


@dataclass
class _Snake:
    dashes: list[Dash]
    pivot: tuple[int, int]
    theta: float
    tip: tuple[int, int]  # free end of the newest dash

    @property
    def last(self) -> Dash:
        return self.dashes[-1]


@dataclass
class Sample:
    """A rendered image with its ground truth.

    `targets[i]` lists path i's dashes from its origin tip (`targets[i][0].start`) outwards; its terminal tip is
    `terminal_tips[i]` (the start of its last dash). `markers` are the two circle centres and `marker_paths` the
    path each lies on; label 1 iff both markers are on the same path.
    """

    image: np.ndarray  # (H, W) uint8
    label: int
    margin: int
    targets: list[list[Dash]]
    origin_tips: list[tuple[int, int]]
    terminal_tips: list[tuple[int, int]]
    markers: tuple[tuple[int, int], tuple[int, int]]
    marker_paths: tuple[int, int]
    distractors: list[list[Dash]]
    target_attempts: int


def _reverse(theta: float) -> float:
    return theta + math.pi if theta + math.pi < math.pi else theta - math.pi


def _inside(pt: tuple[int, int], n: int) -> bool:
    return 0 <= pt[0] < n and 0 <= pt[1] < n


def _seed(g: Geometry, rng: np.random.Generator, occ: np.ndarray | None, margin: int) -> tuple | None:
    """Seed dash (tail, θ, pivot) on free ground; occ=None means a first target (band 2·seed_distance)."""
    p, n = g.p, g.p.resolution
    for _ in range(p.max_paddle_retrial + 1):
        deg = int(rng.integers(-180, 180))
        theta = deg * np.pi / 180
        avail = g.target_seed_available(deg, margin) if occ is None else g.seed_available(occ, theta, margin, 1)
        if avail.size == 0:
            return None
        tail = divmod(int(avail[int(rng.integers(0, avail.size))]), n)
        head = translate(tail, theta, p.paddle_length)
        pivot = translate(head, _reverse(theta), p.paddle_length + margin)
        if _inside(head, n) and _inside(pivot, n):
            return tail, theta, pivot
    return None


def _extend(g: Geometry, rng: np.random.Generator, occ: np.ndarray, snake: _Snake, margin: int,
            contrast: float) -> bool:
    """Add one dash to `snake` (§2.6); on success commit the previous dash's footprint (one dash late)."""
    p, n, q = g.p, g.p.resolution, g.pad
    piv = translate(snake.pivot, snake.theta, p.paddle_length + 2 * margin)
    offs, gather, orient, weights, thetas = g.candidates(margin, snake.theta)
    lo, hi = p.paddle_length + margin + 1, n - p.paddle_length - margin - 2
    if not (lo <= piv[0] <= hi and lo <= piv[1] <= hi):  # near the edge: drop off-canvas candidates
        rows, cols = piv[0] + offs[:, 0], piv[1] + offs[:, 1]
        ok = np.flatnonzero((rows >= 0) & (rows < n) & (cols >= 0) & (cols < n))
        if ok.size == 0:
            return False
        offs, gather, orient, weights, thetas = offs[ok], gather[ok], orient[ok], weights[ok], thetas[ok]
    base = (piv[0] + q) * occ.shape[1] + piv[1] + q
    dilated = occ.ravel()[base + gather].max(axis=1)  # occupancy dilated by the margin disk, at the candidates
    cmf = np.cumsum((1.0 - dilated) * weights)
    total = float(cmf[-1])
    if total < 1e-4:
        return False
    for _ in range(p.max_paddle_retrial + 1):
        i = min(int(np.searchsorted(cmf, rng.random() * total, side="right")), cmf.size - 1)
        start, theta = (piv[0] + int(offs[i, 0]), piv[1] + int(offs[i, 1])), float(thetas[i])
        if (occ[g.region(start, margin)] + g.patch(theta, margin)[1]).max() < 1.8:
            break
    else:
        return False
    g.commit(occ, snake.last.start, snake.last.theta, margin)
    snake.dashes.append(Dash(start, theta, contrast))
    snake.pivot, snake.theta, snake.tip = piv, float(orient[i]), start
    return True


def _two_targets(g: Geometry, rng: np.random.Generator, margin: int) -> tuple[np.ndarray, list[_Snake]] | None:
    """One attempt at the two target snakes (§2.5 step 3); None if it must be restarted."""
    p, n = g.p, g.p.resolution
    mus = list(p.snake_contrasts) * 2
    if len(p.snake_contrasts) > 1:
        mus = [mus[i] for i in rng.permutation(len(mus))]
    pcs = p.paddle_contrasts
    first = _seed(g, rng, None, margin)
    if first is None:
        return None
    tail1, theta1, pivot1 = first
    c1 = pcs[int(rng.integers(0, len(pcs)))] if len(pcs) > 1 else pcs[0]
    c2 = pcs[int(rng.integers(0, len(pcs)))] if len(pcs) > 1 else pcs[0]
    for _ in range(p.max_paddle_retrial + 1):
        theta2 = int(rng.integers(-180, 180)) * np.pi / 180
        phi = int(rng.integers(0, 360)) * np.pi / 180
        tail2 = (round(tail1[0] + p.seed_distance * math.sin(phi)), round(tail1[1] + p.seed_distance * math.cos(phi)))
        head2 = translate(tail2, theta2, p.paddle_length)
        pivot2 = translate(head2, _reverse(theta2), p.paddle_length + margin)
        if _inside(head2, n) and _inside(pivot2, n):
            break
    else:
        return None
    snakes = [_Snake([Dash(tail1, theta1, c1 * mus[0])], pivot1, theta1, tail1),
              _Snake([Dash(tail2, theta2, c2 * mus[1])], pivot2, theta2, tail2)]
    occ = g.base_occupancy.copy()
    for _ in range(p.contour_length - 1):
        pc = pcs[int(rng.integers(0, len(pcs)))]
        for i, snake in enumerate(snakes):
            if not _extend(g, rng, occ, snake, margin, pc * mus[i]):
                return None
    g.commit(occ, snakes[1].last.start, snakes[1].last.theta, margin)  # quirk: snake 0's last dash stays free
    return occ, snakes


def _distractor(g: Geometry, rng: np.random.Generator, occ: np.ndarray, margin: int) -> list[Dash] | None:
    """One attempt at a distractor snake, mutating `occ`; None on failure (the caller reverts `occ`)."""
    p, cs = g.p, g.p.snake_contrasts
    contrast = cs[int(rng.integers(0, len(cs)))]
    if np.count_nonzero(g.interior(occ) <= OCCUPIED) < 0.01 * p.resolution ** 2:
        return None
    seed = _seed(g, rng, occ, margin)
    if seed is None:
        return None
    tail, theta, pivot = seed
    snake = _Snake([Dash(tail, theta, contrast)], pivot, theta, tail)
    for _ in range(p.distractor_length - 1):
        if not _extend(g, rng, occ, snake, margin, cs[int(rng.integers(0, len(cs)))]):
            return None
    g.commit(occ, snake.last.start, snake.last.theta, margin)
    return snake.dashes


def render_sample(rng: np.random.Generator, params: PathfinderParams, max_target_attempts: int = 100_000) -> Sample:
    """Draw one Pathfinder image (§2.5) with `rng`; returns the uint8 image, label and geometry."""
    g, p = geometry(params), params
    label = int(rng.integers(0, 2))
    margin = p.margins[int(rng.integers(0, len(p.margins)))]
    for attempt in range(1, max_target_attempts + 1):
        built = _two_targets(g, rng, margin)
        if built is not None:
            break
    else:
        raise RuntimeError(f"no two-snake configuration after {max_target_attempts} attempts ({p})")
    occ, snakes = built
    distractors: list[list[Dash]] = []
    for _ in range(p.num_distractors):
        for _ in range(p.max_distractor_retrial + 1):
            trial = occ.copy()
            dashes = _distractor(g, rng, trial, margin)
            if dashes is not None:
                occ = trial
                distractors.append(dashes)
                break
    canvas = np.zeros_like(occ)
    for dash in [d for s in snakes for d in s.dashes] + [d for s in distractors for d in s]:
        view = canvas[g.region(dash.start, margin)]
        np.maximum(view, g.tinted(dash.theta, margin, dash.contrast), out=view)
    canvas = g.interior(canvas).copy()
    origin = int(rng.integers(0, 2))
    terminal = origin if label == 1 else 1 - origin
    marks = (snakes[origin].dashes[0].start, snakes[terminal].tip)
    for tip in marks:
        sl, disk = marker(p.resolution, tip, p.marker_radius, p.aa_scale)
        np.maximum(canvas[sl], disk, out=canvas[sl])
    return Sample(image=to_uint8(canvas), label=label, margin=margin, targets=[s.dashes for s in snakes],
                  origin_tips=[s.dashes[0].start for s in snakes], terminal_tips=[s.tip for s in snakes],
                  markers=marks, marker_paths=(origin, terminal), distractors=distractors, target_attempts=attempt)
