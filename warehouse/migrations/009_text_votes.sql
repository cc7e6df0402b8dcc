-- 009: the text-vote labelling beside the product's labels (issue 19).
-- Since offline-v8 a head's label is decided by the model's own zero-shot reading of each property
-- (docs/text.md); the rule before it, offline-v7, decided from the head's TextSpan texts alone: each
-- text votes for its property when the rest of the model reads it as the head does (the paper's
-- route: a head is named by the texts that span it). v8 keeps v7's decision in head_labels.raw
-- ('$.v7.property'). This labelling, 'text-votes', joins the agreement views, so kappa, wrong and
-- invented labels are measured for both, and model_measures carries its kappa as 'kappa_texts'.
CREATE OR REPLACE VIEW head_labelings AS
SELECT model_id, 'labeler' AS labeling, 0 AS draw, layer, head, property FROM head_labels
UNION ALL
SELECT model_id, baseline, draw, layer, head, property FROM baseline_labels
UNION ALL
SELECT h.model_id, 'constant:' || c.property, 0, h.layer, h.head, c.property
FROM head_labels h
CROSS JOIN (SELECT property FROM factor_properties UNION ALL SELECT 'mixed') c
UNION ALL
SELECT model_id, 'text-votes', 0, layer, head, json_extract_string(raw, '$.v7.property')
FROM head_labels
WHERE labeler = 'offline' AND json_valid(raw) AND json_extract_string(raw, '$.v7.property') IS NOT NULL;

CREATE OR REPLACE VIEW model_measures AS
WITH k AS MATERIALIZED (SELECT * FROM label_kappa),
p AS MATERIALIZED (SELECT * FROM paper_scores)
SELECT model_id, dataset_id, score, value, lo, hi FROM (
    SELECT model_id, dataset_id, 'kappa' AS score, kappa AS value, kappa_lo AS lo, kappa_hi AS hi FROM k
    UNION ALL SELECT model_id, dataset_id, 'kappa_margin_shuffled', margin_shuffled, margin_shuffled_lo,
                     margin_shuffled_hi FROM k
    UNION ALL SELECT model_id, dataset_id, 'kappa_margin_constant', margin_constant, margin_constant_lo,
                     margin_constant_hi FROM k
    UNION ALL SELECT model_id, dataset_id, 'wrong_rate', wrong_rate, wrong_lo, wrong_hi FROM k
    UNION ALL SELECT model_id, dataset_id, 'invented_rate', invented_rate, invented_lo, invented_hi FROM k
    UNION ALL SELECT k.model_id, k.dataset_id, 'paper_association', p.association, p.association_lo,
                     p.association_hi FROM k JOIN p USING (model_id)
    UNION ALL SELECT k.model_id, k.dataset_id, 'paper_entanglement', p.entanglement, NULL, NULL
              FROM k JOIN p USING (model_id)
    UNION ALL SELECT model_id, dataset_id, 'kappa_texts', kappa, NULL, NULL
              FROM labeling_agreement WHERE labeling = 'text-votes'
    UNION ALL SELECT model_id, dataset_id, score, value, lo, hi FROM code_scores
);
