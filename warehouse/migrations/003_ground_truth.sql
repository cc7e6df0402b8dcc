-- 003: exact TextSpan's r, the offline labeler's evidence, and the shapes world's ground truth
-- (MATH.md §3, §4 and §7).

-- The number of directions of the head's subspace TextSpan used: min(r asked, the head's
-- numerical rank, its head dimension). NULL for rows written before this migration.
ALTER TABLE head_texts ADD COLUMN r INTEGER;

-- The offline labeler's p-value: the chance that tags shuffled over the bank give some
-- property at least the winning share of the head's TextSpan variance. NULL for LLM labels.
ALTER TABLE head_labels ADD COLUMN p_value DOUBLE;

-- The one property of each factor of the shapes world (written by the probe job from
-- etl/textbank.py WORLD_FACTOR_PROPERTIES).
CREATE TABLE factor_properties (
    factor   VARCHAR PRIMARY KEY,         -- 'shape', 'color', 'size', 'position', 'count', 'pattern', 'background'
    property VARCHAR NOT NULL             -- 'shapes', 'colors', 'sizes', 'positions', 'counting', 'textures', 'backgrounds'
);

-- eta2(h, f) of MATH.md §7: the share of head h's embedding variance over the dataset's images
-- that the class means of factor f explain (in [0, 1]).
CREATE TABLE head_factor_variance (
    model_id   VARCHAR NOT NULL,
    dataset_id VARCHAR NOT NULL,
    layer      INTEGER NOT NULL,
    head       INTEGER NOT NULL,
    factor     VARCHAR NOT NULL,
    eta2       DOUBLE NOT NULL,
    run_id     VARCHAR,
    PRIMARY KEY (model_id, dataset_id, layer, head, factor)
);

-- One row per (model, dataset, head): the factor that explains most of the head's variance,
-- and whether the head is specialised in it (eta2 >= 0.4 and >= 3 x the second factor's).
CREATE VIEW head_truth AS
WITH ranked AS (
    SELECT v.*, row_number() OVER (PARTITION BY model_id, dataset_id, layer, head
                                   ORDER BY eta2 DESC, factor) AS pos
    FROM head_factor_variance v
)
SELECT
    a.model_id,
    a.dataset_id,
    a.layer,
    a.head,
    'L' || a.layer || '.H' || a.head                              AS head_name,
    a.factor                                                      AS top_factor,
    a.eta2                                                        AS top_eta2,
    coalesce(b.eta2, 0.0)                                         AS second_eta2,
    a.eta2 >= 0.4 AND a.eta2 >= 3 * coalesce(b.eta2, 0.0)         AS specialised,
    CASE WHEN a.eta2 >= 0.4 AND a.eta2 >= 3 * coalesce(b.eta2, 0.0) THEN a.factor END   AS true_factor,
    CASE WHEN a.eta2 >= 0.4 AND a.eta2 >= 3 * coalesce(b.eta2, 0.0) THEN fp.property END AS true_property
FROM ranked a
LEFT JOIN ranked b
       ON b.model_id = a.model_id AND b.dataset_id = a.dataset_id AND b.layer = a.layer
      AND b.head = a.head AND b.pos = 2
LEFT JOIN factor_properties fp ON fp.factor = a.factor
WHERE a.pos = 1;

-- One row per labelled head with ground truth: is its label right (specialised heads) or
-- false (unspecialised heads: a label other than 'mixed' whose property no factor with
-- eta2 >= 0.2 carries)?
CREATE VIEW head_label_truth AS
SELECT
    t.*,
    hl.property                                                   AS label,
    hl.labeler,
    hl.confidence,
    hl.p_value,
    CASE WHEN t.specialised THEN hl.property = t.true_property END AS label_right,
    CASE WHEN NOT t.specialised THEN hl.property <> 'mixed' AND NOT EXISTS (
        SELECT 1 FROM head_factor_variance v JOIN factor_properties fp USING (factor)
        WHERE v.model_id = t.model_id AND v.dataset_id = t.dataset_id AND v.layer = t.layer
          AND v.head = t.head AND v.eta2 >= 0.2 AND fp.property = hl.property)
    END                                                           AS label_false
FROM head_truth t
JOIN head_labels hl USING (model_id, layer, head);

-- One row per (model, dataset): how well the labels agree with the known factors.
CREATE VIEW label_agreement AS
SELECT
    model_id,
    dataset_id,
    any_value(labeler)                                            AS labeler,
    CAST(count(*) AS INTEGER)                                     AS n_heads,
    CAST(count(*) FILTER (WHERE specialised) AS INTEGER)          AS n_specialised,
    CAST(count(*) FILTER (WHERE label_right) AS INTEGER)          AS n_right,
    CAST(count(*) FILTER (WHERE NOT specialised) AS INTEGER)      AS n_unspecialised,
    CAST(count(*) FILTER (WHERE label_false) AS INTEGER)          AS n_false,
    count(*) FILTER (WHERE label_right) / nullif(count(*) FILTER (WHERE specialised), 0)      AS agreement,
    count(*) FILTER (WHERE label_false) / nullif(count(*) FILTER (WHERE NOT specialised), 0)  AS false_label_rate
FROM head_label_truth
GROUP BY model_id, dataset_id;
