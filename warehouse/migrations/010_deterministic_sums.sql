-- 010: the score views give the same bits on every query (issue 22's cache check found tag_entropy
-- differing in the last bit between two reads of one warehouse). DuckDB adds floats in whatever order
-- its threads meet the rows, and floating-point addition is not associative; an aggregate with an
-- ORDER BY adds in that order. The views are 007's, with every float sum and mean ordered: over a
-- head's tag buckets by property, its texts by rank, a model's or a property's heads by (layer, head), the
-- tag-shuffled labeler's draws by draw (label_kappa and its bootstrap).

CREATE OR REPLACE VIEW head_scores AS
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
        -sum((n_texts / k) * ln(n_texts / k) ORDER BY property)   AS entropy
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
        sum(variance_explained ORDER BY rank)                     AS variance_explained,
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
    END                                                           AS tag_entropy,
    CAST(e.k AS INTEGER)                                          AS n_texts,
    CAST(a.n_matches AS INTEGER)                                  AS n_matches,
    CAST(e.n_buckets AS INTEGER)                                  AS n_text_properties,
    a.variance_explained,
    a.top_text
FROM assoc a
JOIN entropy e USING (model_id, layer, head)
LEFT JOIN head_labels hl USING (model_id, layer, head);

-- One row per (model, layer): the per-layer spread behind the model scores.
CREATE OR REPLACE VIEW layer_scores AS
SELECT
    model_id, layer,
    avg(association ORDER BY layer, head)  FILTER (WHERE property IS NOT NULL)        AS association,
    avg(tag_entropy ORDER BY layer, head)  FILTER (WHERE property IS NOT NULL)        AS tag_entropy,
    CAST(count(*) FILTER (WHERE property IS NOT NULL) AS INTEGER) AS n_heads,
    CAST(count(*) AS INTEGER)                                     AS n_analysed_heads
FROM head_scores
GROUP BY model_id, layer;

-- One row per model: means over its labelled heads ('mixed' heads included: their association is
-- 0 by tag, since no text is tagged 'mixed').
CREATE OR REPLACE VIEW model_scores AS
SELECT
    model_id,
    avg(association ORDER BY layer, head)  FILTER (WHERE property IS NOT NULL)        AS association,
    avg(tag_entropy ORDER BY layer, head)  FILTER (WHERE property IS NOT NULL)        AS tag_entropy,
    CAST(count(*) FILTER (WHERE property IS NOT NULL) AS INTEGER) AS n_heads,
    CAST(count(*) AS INTEGER)                                     AS n_analysed_heads,
    CAST(count(*) FILTER (WHERE property = 'mixed') AS INTEGER)   AS n_mixed_heads,
    CAST(count(DISTINCT property) FILTER (WHERE property <> 'mixed') AS INTEGER) AS n_properties,
    stddev_samp(association ORDER BY layer, head)  FILTER (WHERE property IS NOT NULL) AS association_std,
    stddev_samp(tag_entropy ORDER BY layer, head)  FILTER (WHERE property IS NOT NULL) AS tag_entropy_std
FROM head_scores
GROUP BY model_id;

-- property_heads as in 007, its sums over texts and means over heads ordered.
CREATE OR REPLACE VIEW property_heads AS
WITH tagged AS (
    SELECT
        model_id, text_property AS property,
        sum(variance_explained ORDER BY layer, head, rank)             AS var_all,
        coalesce(sum(variance_explained ORDER BY layer, head, rank) FILTER (WHERE label = text_property), 0)
                                                                       AS var_in_heads
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
    avg(s.association ORDER BY s.layer, s.head)                    AS association,
    avg(s.tag_entropy ORDER BY s.layer, s.head)                    AS tag_entropy,
    avg(s.confidence ORDER BY s.layer, s.head)                     AS confidence,
    any_value(t.var_in_heads / nullif(t.var_all, 0))               AS variance_concentration
FROM head_scores s
JOIN totals tot USING (model_id)
LEFT JOIN tagged t USING (model_id, property)
WHERE s.property IS NOT NULL
GROUP BY s.model_id, s.property;

-- paper_scores as in 007, the mean association over a model's property heads ordered.
CREATE OR REPLACE VIEW paper_scores AS
WITH carried AS (
    SELECT * FROM head_scores WHERE property IS NOT NULL AND property <> 'mixed'
),
per_property AS (
    SELECT model_id, property, count(*) AS n FROM carried GROUP BY model_id, property
),
ent AS (
    SELECT model_id, sum(n) AS n_heads, count(*) AS n_properties FROM per_property GROUP BY model_id
),
assoc AS (
    SELECT model_id, avg(association ORDER BY layer, head) AS association,
           stddev_samp(association ORDER BY layer, head) / sqrt(count(*)) AS association_se
    FROM carried GROUP BY model_id
)
SELECT
    m.model_id,
    CAST(coalesce(e.n_heads, 0) AS INTEGER)                        AS n_property_heads,
    CAST(m.n_analysed_heads AS INTEGER)                            AS n_analysed_heads,
    CAST(coalesce(e.n_properties, 0) AS INTEGER)                   AS n_properties,
    a.association,
    a.association - 1.96 * a.association_se                        AS association_lo,
    a.association + 1.96 * a.association_se                        AS association_hi,
    (e.n_heads - e.n_properties) / nullif(e.n_heads, 0)            AS entanglement
FROM model_scores m
LEFT JOIN ent e USING (model_id)
LEFT JOIN assoc a USING (model_id);

-- label_kappa_bootstrap as in 007, the mean over the tag-shuffled draws taken in draw order.
CREATE OR REPLACE VIEW label_kappa_bootstrap AS
WITH lt AS MATERIALIZED (
    SELECT model_id, dataset_id, labeling, draw, layer, head, label_category, true_category
    FROM labeling_truth WHERE labeling IN ('labeler', 'tag-shuffled')
),
heads AS (
    SELECT model_id, dataset_id, layer, head,
           row_number() OVER (PARTITION BY model_id, dataset_id ORDER BY layer, head) - 1 AS i,
           count(*) OVER (PARTITION BY model_id, dataset_id)                         AS n
    FROM lt WHERE labeling = 'labeler'
),
picks AS (        -- how often each head is drawn in each resample
    SELECT model_id, dataset_id, b, i, count(*) AS w
    FROM (SELECT s.model_id, s.dataset_id, b.range AS b,
                 CAST(hash(s.model_id, s.dataset_id, b.range, j.range) % s.n AS BIGINT) AS i
          FROM (SELECT DISTINCT model_id, dataset_id, n FROM heads) s, range(1000) b, range(s.n) j)
    GROUP BY model_id, dataset_id, b, i
),
drawn AS (
    SELECT p.b, p.w, t.model_id, t.dataset_id, t.labeling, t.draw, t.label_category, t.true_category
    FROM picks p
    JOIN heads h USING (model_id, dataset_id, i)
    JOIN lt t USING (model_id, dataset_id, layer, head)
),
marginals AS (
    SELECT model_id, dataset_id, labeling, draw, b, category, sum(nl) AS nl, sum(nt) AS nt
    FROM (SELECT model_id, dataset_id, labeling, draw, b, label_category AS category, w AS nl, 0 AS nt FROM drawn
          UNION ALL
          SELECT model_id, dataset_id, labeling, draw, b, true_category, 0, w FROM drawn)
    GROUP BY model_id, dataset_id, labeling, draw, b, category
),
chance AS (
    SELECT model_id, dataset_id, labeling, draw, b, sum(nl * nt) AS s
    FROM marginals GROUP BY model_id, dataset_id, labeling, draw, b
),
per AS (
    SELECT model_id, dataset_id, labeling, draw, b,
           sum(w) AS n, coalesce(sum(w) FILTER (WHERE label_category = true_category), 0) AS n_agree
    FROM drawn GROUP BY model_id, dataset_id, labeling, draw, b
),
kappas AS (
    SELECT p.model_id, p.dataset_id, p.labeling, p.draw, p.b,
           CASE WHEN c.s < p.n * p.n
                THEN (p.n_agree / p.n - c.s / (p.n * p.n)) / (1 - c.s / (p.n * p.n)) END AS kappa
    FROM per p JOIN chance c USING (model_id, dataset_id, labeling, draw, b)
)
SELECT model_id, dataset_id, b,
       any_value(kappa) FILTER (WHERE labeling = 'labeler')                    AS kappa,
       avg(kappa ORDER BY draw) FILTER (WHERE labeling = 'tag-shuffled')                     AS shuffled_kappa,
       any_value(kappa) FILTER (WHERE labeling = 'labeler')
           - avg(kappa ORDER BY draw) FILTER (WHERE labeling = 'tag-shuffled')               AS margin_shuffled
FROM kappas
GROUP BY model_id, dataset_id, b;

-- label_kappa as in 007, the means over the tag-shuffled draws taken in draw order.
CREATE OR REPLACE VIEW label_kappa AS
WITH lab AS (
    SELECT a.*, hl.labeler FROM labeling_agreement a
    JOIN (SELECT model_id, any_value(labeler) AS labeler FROM head_labels GROUP BY model_id) hl USING (model_id)
    WHERE a.labeling = 'labeler'
),
const AS (
    SELECT model_id, dataset_id,
           arg_max(substr(labeling, 10), accuracy)                 AS constant_label,
           max(accuracy)                                           AS constant_accuracy,
           arg_max(n_wrong, accuracy)                              AS constant_wrong,
           arg_max(n_invented, accuracy)                           AS constant_invented
    FROM labeling_agreement WHERE labeling LIKE 'constant:%'
    GROUP BY model_id, dataset_id
),
shuf AS (
    SELECT model_id, dataset_id,
           count(*)                                                AS draws,
           avg(kappa ORDER BY draw)                 AS kappa_mean,
           stddev_samp(kappa ORDER BY draw)         AS kappa_sd,
           min(kappa)                               AS kappa_min,
           max(kappa)                               AS kappa_max,
           avg(n_wrong / nullif(n_specialised, 0) ORDER BY draw)   AS wrong_rate,
           avg(n_invented / n_heads ORDER BY draw)                 AS invented_rate
    FROM labeling_agreement WHERE labeling = 'tag-shuffled'
    GROUP BY model_id, dataset_id
),
boot AS (
    SELECT model_id, dataset_id,
           quantile_cont(kappa, 0.025)                             AS kappa_lo,
           quantile_cont(kappa, 0.975)                             AS kappa_hi,
           quantile_cont(margin_shuffled, 0.025)                   AS margin_lo,
           quantile_cont(margin_shuffled, 0.975)                   AS margin_hi
    FROM label_kappa_bootstrap GROUP BY model_id, dataset_id
),
wilson AS (
    SELECT model_id, dataset_id, 1.96 AS z,
           CAST(n_wrong AS DOUBLE) / nullif(n_specialised, 0)      AS pw, n_specialised AS nw,
           CAST(n_invented AS DOUBLE) / n_heads                    AS pi, n_heads AS ni
    FROM lab
)
SELECT
    l.model_id, l.dataset_id, l.labeler, l.n_heads, l.n_specialised,
    l.kappa, b.kappa_lo, b.kappa_hi, l.accuracy,
    l.n_wrong, w.pw AS wrong_rate,
    CASE WHEN w.pw = 0 THEN 0.0 ELSE greatest(0.0, (w.pw + z*z/(2*w.nw) - z*sqrt(w.pw*(1-w.pw)/w.nw + z*z/(4*w.nw*w.nw))) / (1 + z*z/w.nw)) END AS wrong_lo,
    CASE WHEN w.pw = 1 THEN 1.0 ELSE least(1.0, (w.pw + z*z/(2*w.nw) + z*sqrt(w.pw*(1-w.pw)/w.nw + z*z/(4*w.nw*w.nw))) / (1 + z*z/w.nw)) END AS wrong_hi,
    l.n_invented, w.pi AS invented_rate,
    CASE WHEN w.pi = 0 THEN 0.0 ELSE greatest(0.0, (w.pi + z*z/(2*w.ni) - z*sqrt(w.pi*(1-w.pi)/w.ni + z*z/(4*w.ni*w.ni))) / (1 + z*z/w.ni)) END AS invented_lo,
    CASE WHEN w.pi = 1 THEN 1.0 ELSE least(1.0, (w.pi + z*z/(2*w.ni) + z*sqrt(w.pi*(1-w.pi)/w.ni + z*z/(4*w.ni*w.ni))) / (1 + z*z/w.ni)) END AS invented_hi,
    c.constant_label, c.constant_accuracy, 0.0 AS constant_kappa,
    CAST(c.constant_wrong AS DOUBLE) / nullif(l.n_specialised, 0) AS constant_wrong_rate,
    CAST(c.constant_invented AS DOUBLE) / l.n_heads                AS constant_invented_rate,
    CAST(s.draws AS INTEGER)                                        AS shuffled_draws,
    s.kappa_mean AS shuffled_kappa, s.kappa_sd AS shuffled_kappa_sd,
    s.kappa_min AS shuffled_kappa_min, s.kappa_max AS shuffled_kappa_max,
    s.wrong_rate AS shuffled_wrong_rate, s.invented_rate AS shuffled_invented_rate,
    l.kappa - s.kappa_mean                                          AS margin_shuffled,
    b.margin_lo                                                     AS margin_shuffled_lo,
    b.margin_hi                                                     AS margin_shuffled_hi,
    l.kappa                                                         AS margin_constant,
    b.kappa_lo                                                      AS margin_constant_lo,
    b.kappa_hi                                                      AS margin_constant_hi
FROM lab l
JOIN wilson w USING (model_id, dataset_id)
LEFT JOIN const c USING (model_id, dataset_id)
LEFT JOIN shuf s USING (model_id, dataset_id)
LEFT JOIN boot b USING (model_id, dataset_id);
