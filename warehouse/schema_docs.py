"""One-line meanings of the warehouse's tables, views and columns, for the dashboard's schema
browser (issue 10 item 7; read through `warehouse.queries.schema_browser`).

Relations: RELATIONS below (the README's tables, in one line each). Columns: the SQL comments of
the migrations themselves (`warehouse/migrations/NNN_*.sql`), so a new migration documents its
columns where it defines them:

    CREATE TABLE t (
        col  TYPE ...,        -- this comment is col's meaning
        -- or a comment on the lines just above the column
        col2 TYPE ...
    );
    -- a comment on the lines just above
    ALTER TABLE t ADD COLUMN col3 TYPE;

A table rebuilt under a temporary name (004's `<table>_keyed`) documents `<table>`. The first
migration that documents a column wins.
"""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

MIGRATIONS = Path(__file__).with_name("migrations")

RELATIONS: dict[str, str] = {
    "schema_migrations": "applied migration files",
    "models": "one row per model (model_id = arch/tag); analysed_layers: the 0-based layers whose heads are stored",
    "datasets": "image sets: shapes:N:seed=S, skimage, folder:<path>, csv:<path>",
    "images": "one row per image: its path or generator key, pixel sha256, label, caption, JPEG thumbnail",
    "image_factors": "ground truth of generated scenes, one row per image and factor",
    "image_embeddings": "the unit image embedding of each (model, image)",
    "head_embeddings": "c[l,h] of MATH.md §1: head (layer, head)'s additive share of the unit image embedding",
    "head_embeddings_base": "the table behind the head_embeddings view while shards are attached in place",
    "component_means": "dataset mean of each component (L11.H3, L11.attn, L11.mlp, embed, and pool_mlp for towers whose "
                       "attention pool ends in an MLP: SigLIP), for mean ablation",
    "properties": "the property vocabulary (colors, animals, locations, ...)",
    "texts": "text banks; property = the text's tag, NULL when unknown",
    "text_embeddings": "unit text embeddings per model",
    "head_texts": "TextSpan output (MATH.md §3): each head's texts in the order chosen, with variance explained",
    "head_labels": "one label per head (a property or 'mixed') and the labeler's evidence",
    "text_judgments": "match(text, property) per head text from a judge (tag or llm:<model>)",
    "ablations": "mean-ablation study: zero-shot accuracy with components replaced by their means",
    "probes": "held-out linear-probe accuracy of a head's embedding for a ground-truth factor, beside chance",
    "head_factor_variance": "eta2 of MATH.md §7: the share of a head's variance a factor's class means explain",
    "factor_properties": "the one property of each shapes-world factor",
    "runs": "one row per job execution: status, parameters, error, process",
    "errors": "items a job skipped (unreadable, truncated, oversized files, ...) and why",
    "shard_sets": "Parquet shard sets registered by `attach` (mode copy or in_place)",
    "head_text_matches": "view: one row per (head, TextSpan text) with the head's label, the text's tag and match",
    "head_property_counts": "view: how many of a head's texts carry each property tag",
    "head_scores": "view: one row per analysed head: label, association, tag_entropy (MATH.md §5)",
    "layer_scores": "view: per-layer means of association and tag_entropy over labelled heads",
    "model_scores": "view: per-model means of association and tag_entropy over labelled heads",
    "property_heads": "view: per model and label, the heads carrying it and how concentrated its variance is",
    "head_truth": "view: per head and shapes dataset, the factor explaining most of its variance; specialised or not",
    "head_label_truth": "view: head_truth with each head's label: is the label right, or false?",
    "label_agreement": "view: per model and shapes dataset, labels against the known factors (agreement, false rate)",
    "world_seeds": "which shapes-world seeds were used for training, tuning, the study and the demo",
    "baseline_labels": "labels of the tag-shuffled labeler (the offline rule on permuted tags), one per draw",
    "code_scores": "label-free ground truth per model and shapes dataset: informativeness, DCI's D/C/I, MIG",
    "study_scores": "the size study: every score of every model on each held-out world",
    "study_sizes": "the size study: per size, the mean over model seeds with a 95 % interval",
    "study_verdicts": "the size study: per score, the trend against log parameters and its verdict",
    "paper_scores": "view: Madasu et al.'s association and entanglement, as read from the paper's words",
    "head_labelings": "view: every labelling the agreement views compare: the labeler, the shuffled draws, constants, the text votes (offline-v7, from raw)",
    "labeling_truth": "view: per labelling and head, the label's category beside the true one; wrong, invented",
    "labeling_agreement": "view: per model, dataset and labelling, Cohen's kappa and the counts behind it",
    "label_kappa_bootstrap": "view: the head bootstrap behind label_kappa's intervals, one row per resample",
    "label_kappa": "view: per model and dataset, kappa with its interval beside the constant and shuffled baselines",
    "model_measures": "view: every score of a model on a shapes dataset, long format (score, value, lo, hi)",
    "neuron_layers": "neurons (MATH.md §10): one row per analysed MLP layer: dataset, width, later heads, pool heads, settings",
    "neuron_stats": "one row per neuron: its second-order effect norms (mean, quantiles, share of images where it "
                    "matters, histogram), principal direction pc and how well texts reconstruct it",
    "neuron_top_images": "the images of largest second-order effect norm of each neuron",
    "neuron_texts": "the sparse text decomposition (orthogonal matching pursuit) of each neuron's pc",
    "neuron_labels": "one label per neuron from its texts (offline labeler), and tag-shuffled baseline labels",
    "neuron_head_effects": "how much of each neuron's effect goes through each later head (mean norm)",
    "neuron_factor_variance": "eta2 of MATH.md §7 for each neuron's effects on a shapes dataset",
    "neuron_ablations": "zero-shot accuracy on the toy eval with a layer's neuron effects replaced (zero, mean, "
                        "rank-1, sparse texts)",
    "neuron_alpha": "per-image alpha [K x M] of every neuron (only when the neurons job ran with --store-alpha)",
    "neuron_truth": "view: per neuron and shapes dataset, the factor explaining most of its effects; specialised or not",
    "neuron_labeling_truth": "view: each neuron label's category beside the true one (as for heads, MATH.md §11)",
    "neuron_label_agreement": "view: per model, dataset, layer and labelling: Cohen's kappa of neuron labels "
                              "against the known factors",
}

_CREATE = re.compile(r"^\s*CREATE\s+TABLE\s+(\w+)\s*\(", re.I)
_ALTER = re.compile(r"^\s*ALTER\s+TABLE\s+(\w+)\s+ADD\s+COLUMN\s+(\w+)\b", re.I)
_COLUMN = re.compile(r"^\s*(\w+)\s+[A-Z]+[A-Z\[\]0-9(), ]*[^-]*?(?:--\s*(.*))?$")
_NOT_COLUMNS = {"PRIMARY", "UNIQUE", "FOREIGN", "CHECK", "CONSTRAINT"}


def _one_line(parts: list[str], limit: int = 200) -> str:
    text = " ".join(p.strip() for p in parts if p.strip())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _without_header(lines: list[str]) -> list[str]:
    """A comment block without a migration's header sentence (`006: what this migration does.`)."""
    if lines and re.match(r"\s*\d{3}:", lines[0]):
        for i, line in enumerate(lines):
            if line.rstrip().endswith("."):
                return lines[i + 1:]
        return []
    return lines


def _table_name(name: str) -> str:
    return name[: -len("_keyed")] if name.endswith("_keyed") else name


@lru_cache(maxsize=1)
def column_meanings() -> dict[tuple[str, str], str]:
    """{(table, column): meaning} from the migrations' SQL comments (see the module docstring)."""
    out: dict[tuple[str, str], str] = {}
    for f in sorted(MIGRATIONS.glob("*.sql")):
        table, above = None, []
        for line in f.read_text(encoding="utf-8").splitlines():
            stripped = line.strip()
            if not stripped:
                above = []
                continue
            if stripped.startswith("--"):
                above.append(stripped[2:])
                continue
            if table is None:
                m = _CREATE.match(line)
                if m:
                    table = _table_name(m.group(1).lower())
                    above = []
                    continue
                m = _ALTER.match(line)
                above = _without_header(above)
                if m and above:
                    out.setdefault((m.group(1).lower(), m.group(2).lower()), _one_line(above))
                above = []
                continue
            if stripped.startswith(")"):
                table, above = None, []
                continue
            m = _COLUMN.match(line)
            if m and m.group(1).upper() not in _NOT_COLUMNS:
                meaning = m.group(2) or _one_line(above)
                if meaning:
                    out.setdefault((table, m.group(1).lower()), _one_line([meaning]))
            above = []
    return out


# Columns that mean the same in every relation (used where a migration's comment says nothing).
COMMON_COLUMNS: dict[str, str] = {
    "model_id": "the model (models.model_id)",
    "image_id": "the image (images.image_id)",
    "dataset_id": "the image set (datasets.dataset_id)",
    "text_id": "the text (texts.text_id)",
    "layer": "0-based layer",
    "head": "0-based head in its layer",
    "head_name": "the head written L<layer>.H<head>",
    "run_id": "the job run that wrote the row (runs.run_id)",
    "created_at": "when the row was written",
    "property": "a property of the vocabulary (properties.property), or 'mixed'",
    "confidence": "the labeler's confidence in the head's label (0..1)",
    "labeler": "'offline' | 'llm:<model>'",
    "association": "mean match of the head's TextSpan texts with its label (MATH.md §5; 1: all match)",
    "tag_entropy": "normalised entropy of the property tags of the head's texts (0: one property; within one head)",
    "entanglement": "the paper's entanglement as read: the share of property heads repeating another's property",
    "kappa": "Cohen's kappa between the label's category and the true one, over all heads (0: chance, 1: perfect)",
    "score": "the name of a score",
    "value": "the score's value",
    "lo": "lower end of the score's 95 % interval",
    "hi": "upper end of the score's 95 % interval",
    "variance_explained": "fraction of the head's total variance (MATH.md §3)",
    "top_text": "the head's first TextSpan text",
    "text": "the text itself (texts.text)",
    "n_texts": "number of TextSpan texts",
    "n_heads": "number of heads",
    "vec": "a vector [d] (FLOAT[])",
}


# Columns whose meaning grew after their migration shipped (a shipped migration is never edited).
COLUMN_NOTES: dict[tuple[str, str], str] = {
    ("models", "pooling"): "how the image tower pools its tokens: 'tok' (the class token), 'avg' (the mean of the "
                           "patch tokens: CLIPA, ViTamin), 'map' (an attention pool with a latent query and an MLP: "
                           "SigLIP, PE-Core; its MLP is the named remainder pool_mlp), 'attn' (CoCa's attentional pooler)",
}


def relation_meaning(name: str) -> str:
    """The one-line meaning of a table or view ('' when undocumented)."""
    return RELATIONS.get(name, "")


def column_meaning(relation: str, column: str) -> str:
    """The meaning of a column: its migration's comment, else the common meaning of its name, else ''."""
    cols = column_meanings()
    base = relation.removesuffix("_base")
    return (COLUMN_NOTES.get((base, column)) or cols.get((relation, column)) or cols.get((base, column))
            or COMMON_COLUMNS.get(column, ""))
