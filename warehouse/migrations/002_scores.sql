-- 002: the scores of MATH.md §5 as views, so that anyone can read or change the formulas.
--
-- For head h with label p(h) and its k TextSpan texts t_1..t_k (head_texts):
--   match(t, p)      = text_judgments.associated when a judgment of (h, t, p) exists,
--                      else (texts.property = p); a text with no tag never matches by tag.
--   association(h)   = mean over the k texts of match(t_i, p(h))         (NULL when unlabelled)
--   entanglement(h)  = -sum_b q_b ln q_b / ln(min(k, B)), q_b = share of the k texts in bucket b,
--                      buckets = text property tags, NULL tags (and texts missing from `texts`)
--                      pooled in the bucket 'unknown'; B = number of possible buckets
--                      = |properties table  U  buckets seen in this head| (so the value stays
--                      in [0, 1] even when the head has untagged or off-vocabulary texts).
--                      0 when min(k, B) <= 1 (one text, or one possible property).
-- A head labelled 'mixed' is scored like any other label: by tag no text matches 'mixed',
-- so its association is 0 unless a judge said otherwise.

-- One row per (head, TextSpan text): the head's label, the text's tag, and match.
CREATE VIEW head_text_matches AS
SELECT
    ht.model_id,
    ht.layer,
    ht.head,
    ht.rank,
    ht.text_id,
    t.text,
    ht.variance_explained,
    hl.property                       AS label,
    t.property                        AS text_property,
    coalesce(t.property, 'unknown')   AS bucket,
    j.associated                      AS judged,
    j.judge                           AS judge,
    CASE
        WHEN hl.property IS NULL THEN NULL
        WHEN j.associated IS NOT NULL THEN j.associated
        ELSE coalesce(t.property = hl.property, false)
    END                               AS "match"
FROM head_texts ht
LEFT JOIN texts t
       ON t.text_id = ht.text_id
LEFT JOIN head_labels hl
       ON hl.model_id = ht.model_id AND hl.layer = ht.layer AND hl.head = ht.head
LEFT JOIN text_judgments j
       ON j.model_id = ht.model_id AND j.layer = ht.layer AND j.head = ht.head
      AND j.text_id = ht.text_id AND j.property = hl.property;

-- One row per (head, bucket): how many of the head's texts carry that property tag.
CREATE VIEW head_property_counts AS
SELECT
    model_id, layer, head, bucket AS property,
    count(*)                  AS n_texts,
    sum(variance_explained)   AS variance_explained
FROM head_text_matches
GROUP BY model_id, layer, head, bucket;

-- One row per analysed head (every head with TextSpan texts).
CREATE VIEW head_scores AS
WITH per_bucket AS (
    SELECT
        c.*,
        sum(c.n_texts) OVER (PARTITION BY c.model_id, c.layer, c.head) AS k,
        c.property NOT IN (SELECT property FROM properties)             AS off_vocabulary
    FROM head_property_counts c
),
entropy AS (
    SELECT
        model_id, layer, head,
        any_value(k)                                              AS k,
        count(*)                                                  AS n_buckets,
        (SELECT count(*) FROM properties)
            + count(*) FILTER (WHERE off_vocabulary)              AS n_possible,
        -sum((n_texts / k) * ln(n_texts / k))                     AS entropy
    FROM per_bucket
    GROUP BY model_id, layer, head
),
assoc AS (
    SELECT
        model_id, layer, head,
        any_value(label)                                          AS label,
        avg(CASE WHEN "match" THEN 1.0 ELSE 0.0 END)
            FILTER (WHERE label IS NOT NULL)                      AS association,
        count(*) FILTER (WHERE "match")                           AS n_matches,
        sum(variance_explained)                                   AS variance_explained,
        arg_min(text, rank)                                       AS top_text
    FROM head_text_matches
    GROUP BY model_id, layer, head
)
SELECT
    a.model_id,
    a.layer,
    a.head,
    'L' || a.layer || '.H' || a.head                              AS head_name,
    a.label                                                       AS property,
    hl.confidence,
    hl.labeler,
    a.association,
    CASE WHEN least(e.k, e.n_possible) <= 1 THEN 0.0
         ELSE greatest(0.0, e.entropy / ln(least(e.k, e.n_possible)))
    END                                                           AS entanglement,
    CAST(e.k AS INTEGER)                                          AS n_texts,
    CAST(a.n_matches AS INTEGER)                                  AS n_matches,
    CAST(e.n_buckets AS INTEGER)                                  AS n_text_properties,
    a.variance_explained,
    a.top_text
FROM assoc a
JOIN entropy e USING (model_id, layer, head)
LEFT JOIN head_labels hl USING (model_id, layer, head);

-- One row per (model, layer): the per-layer spread behind the model scores.
CREATE VIEW layer_scores AS
SELECT
    model_id, layer,
    avg(association)  FILTER (WHERE property IS NOT NULL)        AS association,
    avg(entanglement) FILTER (WHERE property IS NOT NULL)        AS entanglement,
    CAST(count(*) FILTER (WHERE property IS NOT NULL) AS INTEGER) AS n_heads,
    CAST(count(*) AS INTEGER)                                     AS n_analysed_heads
FROM head_scores
GROUP BY model_id, layer;

-- One row per model: means over its labelled heads.
CREATE VIEW model_scores AS
SELECT
    model_id,
    avg(association)  FILTER (WHERE property IS NOT NULL)        AS association,
    avg(entanglement) FILTER (WHERE property IS NOT NULL)        AS entanglement,
    CAST(count(*) FILTER (WHERE property IS NOT NULL) AS INTEGER) AS n_heads,
    CAST(count(*) AS INTEGER)                                     AS n_analysed_heads,
    CAST(count(*) FILTER (WHERE property = 'mixed') AS INTEGER)   AS n_mixed_heads,
    CAST(count(DISTINCT property) FILTER (WHERE property <> 'mixed') AS INTEGER) AS n_properties,
    stddev_samp(association)  FILTER (WHERE property IS NOT NULL) AS association_std,
    stddev_samp(entanglement) FILTER (WHERE property IS NOT NULL) AS entanglement_std
FROM head_scores
GROUP BY model_id;

-- One row per (model, head label): how many heads carry the property, and how concentrated
-- the property is in them: variance_concentration = of all variance explained by texts tagged
-- with the property (summed over every analysed head of the model), the share that falls in
-- heads labelled with it (NULL for 'mixed' and labels no text is tagged with).
CREATE VIEW property_heads AS
WITH tagged AS (
    SELECT
        model_id, text_property AS property,
        sum(variance_explained)                                        AS var_all,
        coalesce(sum(variance_explained) FILTER (WHERE label = text_property), 0) AS var_in_heads
    FROM head_text_matches
    WHERE text_property IS NOT NULL
    GROUP BY model_id, text_property
),
totals AS (
    SELECT model_id, count(*) FILTER (WHERE property IS NOT NULL) AS n_labelled
    FROM head_scores GROUP BY model_id
)
SELECT
    s.model_id,
    s.property,
    CAST(count(*) AS INTEGER)                                      AS n_heads,
    count(*) / any_value(tot.n_labelled)                           AS share_of_heads,
    list(s.head_name ORDER BY s.layer, s.head)                     AS heads,
    list_sort(list_distinct(list(s.layer)))                        AS layers,
    avg(s.association)                                             AS association,
    avg(s.entanglement)                                            AS entanglement,
    avg(s.confidence)                                              AS confidence,
    any_value(t.var_in_heads / nullif(t.var_all, 0))               AS variance_concentration
FROM head_scores s
JOIN totals tot USING (model_id)
LEFT JOIN tagged t USING (model_id, property)
WHERE s.property IS NOT NULL
GROUP BY s.model_id, s.property;
