"""α-expanded mean k-NN for a whole grid of α and k at once: the rule of
:func:`~lookalike.recognize.knn.alpha_mean_knn_classify`, computed from per-class Gram matrices so that the
ladder of :mod:`~lookalike.evaluate.ladder` sweeps α and k without further products.

An evaluation accelerator, not a second classifier: it keeps a ``(n_c, n_c)`` Gram matrix per class (fine
for a benchmark's references, not for a collection's) and computes the similarities in float32, so its
confidences match the library's float64 rule to about 1e-7 (``tests/test_recognition_protocol.py``).
On a Caltech-sized grid it is ~50× faster than calling the library's rule for every α and k."""

from __future__ import annotations

import numpy as np

from lookalike.recognize.knn import TIE_TOLERANCE, Neighbour, Prediction, class_index, get_transform


class AlphaVoter:
    """α-expanded mean k-NN computed through per-class Gram matrices: the rule of
    :func:`~lookalike.recognize.knn.alpha_mean_knn_classify`, with ``q · μ_c = Σ_{i∈M} s_i / ‖Σ_{i∈M} x_i‖``
    and ``‖Σ_{i∈M} x_i‖² = Σ_{i,j∈M} G_ij``, so a grid of α and k costs no further products."""

    def __init__(self, xq: np.ndarray, xb: np.ndarray, labels: np.ndarray) -> None:
        self.labels = np.asarray(labels, dtype=object)
        self.sims = (xq @ xb.T).astype(np.float64)
        self.classes = class_index(self.labels)
        self.position = np.empty(len(self.labels), dtype=np.int64)
        self.gram = {}
        for c, ids in self.classes.items():
            self.position[ids] = np.arange(len(ids))
            self.gram[c] = (xb[ids] @ xb[ids].T).astype(np.float64)

    def classify(self, ids: np.ndarray, alpha: float, transform: str) -> list[Prediction]:
        """Predictions for neighbour ids ``(Q, k)`` (reference positions) with expansion ``alpha``."""
        f = get_transform(transform)
        out = []
        for q, row in enumerate(np.asarray(ids, dtype=np.int64)):
            sims = self.sims[q, row]
            order = np.argsort(-sims, kind="stable")
            groups: dict[str, list[int]] = {}
            for j in order:
                groups.setdefault(self.labels[row[j]], []).append(int(row[j]))
            scores = {}
            for c, neighbours in groups.items():
                gram, at = self.gram[c], self.position[neighbours]
                mask = (np.maximum(2.0 - 2.0 * gram[at], 0.0) <= alpha * alpha).any(axis=0)
                mask[at] = True
                m = mask.astype(np.float64)
                norm = float(np.sqrt(max(m @ gram @ m, 0.0)))
                value = float(self.sims[q, self.classes[c]] @ m) / norm if norm > 1e-12 else 0.0
                scores[c] = float(f(np.array(value)))
            best = max(scores.values())
            label = next(c for c, s in scores.items() if s >= best - TIE_TOLERANCE * max(1.0, abs(best)))
            found = tuple(Neighbour(int(row[j]), self.labels[row[j]], float(sims[j])) for j in order)
            out.append(Prediction(label, scores[label], found))
        return out


__all__ = ["AlphaVoter"]
