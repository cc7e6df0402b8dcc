-- 007: interpretability measured soundly (issue 19; MATH.md §5, §7, §11): agreement corrected for
-- chance with its baselines beside it, the paper's two scores as read from its words, the
-- label-free ground-truth scores, the size study, and which world seeds were used for what.
--
-- Renamed: the within-head entropy that 002 called `entanglement` is `tag_entropy` now (head_scores,
-- layer_scores, model_scores, property_heads). Madasu et al. measure "property disentanglement
-- across heads"; an entropy inside one head is not that. Their entanglement, as read here, is
-- `paper_scores.entanglement`.

-- Which shapes-world seeds were used for what (written by `python -m etl study` from
-- etl/world/seeds.py, the one place in code that lists them), so a reader of a warehouse can tell
-- whether a study's images were ever seen in training or tuning.
CREATE TABLE world_seeds (
    seed    INTEGER NOT NULL,           -- the world seed S of shapes:N:seed=S
    role    VARCHAR NOT NULL,           -- 'training' | 'tuning' | 'eval' | 'study' | 'demo' | 'earlier'
    used_by VARCHAR NOT NULL,           -- what used it, in words
    PRIMARY KEY (seed, role)
);

-- Labels of the tag-shuffled labeler (written by `label`): the offline labeler's rule, constants
-- and model-agreement check, run with the bank's property tags permuted over its texts (draw d:
-- a seeded permutation), so its labels carry no information about the heads. Kept per draw.
CREATE TABLE baseline_labels (
    model_id VARCHAR NOT NULL,
    baseline VARCHAR NOT NULL,          -- 'tag-shuffled'
    draw     INTEGER NOT NULL,          -- 0-based: which seeded permutation of the tags
    layer    INTEGER NOT NULL,
    head     INTEGER NOT NULL,
    property VARCHAR NOT NULL,          -- a property of the vocabulary or 'mixed'
    prompt_hash VARCHAR,                -- the offline labeler's constants it ran with (head_labels.prompt_hash)
    run_id   VARCHAR,
    PRIMARY KEY (model_id, baseline, draw, layer, head)
);

-- Ground-truth scores that need no labels (written by `probe`; etl/world/disentanglement.py): the
-- heads as codes of the world's factors, from the head embeddings and image_factors only.
-- With m[h, f] the plug-in mutual information between factor f and the held-out prediction of head
-- h's ridge probe, and H(f) the factor's entropy on the same images:
--   informativeness = mean_f max_h m[h, f] / H(f)                (the best head's share of each factor)
--   dci_d           = sum_h rho_h (1 - H_F(m[h, :] / sum_f m[h, f])),  rho_h = sum_f m[h, f] / sum m
--   dci_c           = sum_f rho_f (1 - H_G(m[:, f] / sum_h m[h, f])),  rho_f = sum_h m[h, f] / sum m
--                     (Eastwood & Williams 2018, as disentanglement_lib's dci.py, importance = m)
--   dci_i           = mean_f (accuracy - chance) / (1 - chance) of one ridge probe on all heads together
--   mig             = mean_f (m_(1)f - m_(2)f) / H(f)             (Chen et al. 2018, as disentanglement_lib's mig.py)
-- lo / hi: the 95 % basic bootstrap interval over the dataset's images.
CREATE TABLE code_scores (
    model_id   VARCHAR NOT NULL,
    dataset_id VARCHAR NOT NULL,
    score      VARCHAR NOT NULL,        -- 'informativeness' | 'dci_d' | 'dci_c' | 'dci_i' | 'mig'
    value      DOUBLE,                  -- the score on the images as drawn
    lo         DOUBLE,                  -- 95 % basic bootstrap interval over images (n_boot resamples)
    hi         DOUBLE,
    n_boot     INTEGER,                 -- bootstrap resamples behind lo / hi
    run_id     VARCHAR,
    PRIMARY KEY (model_id, dataset_id, score)
);

-- The size study (written by `python -m etl study`): every score of every model on each world...
CREATE TABLE study_scores (
    study        VARCHAR NOT NULL,      -- the study's name: 'zoo' (python -m etl study) or 'demo' (make etl)
    model_id     VARCHAR NOT NULL,
    world_seed   INTEGER NOT NULL,      -- the world seed of the images
    dataset_id   VARCHAR NOT NULL,
    size         VARCHAR NOT NULL,      -- the image tower, '<layers> x <width>'; 'random init' for controls
    image_params BIGINT NOT NULL,       -- parameters of the image tower
    score        VARCHAR NOT NULL,      -- a score of model_measures
    value        DOUBLE,
    lo           DOUBLE,
    hi           DOUBLE,
    run_id       VARCHAR,
    PRIMARY KEY (study, model_id, world_seed, score)
);

-- ... per size: the mean over model seeds (each model's value averaged over the worlds) with a
-- 95 % t interval over the seeds (NULL with one seed) ...
CREATE TABLE study_sizes (
    study        VARCHAR NOT NULL,
    size         VARCHAR NOT NULL,
    image_params BIGINT,                -- the size's image-tower parameters (NULL if its models differ)
    score        VARCHAR NOT NULL,
    n_models     INTEGER NOT NULL,      -- model seeds of this size
    mean         DOUBLE,
    lo           DOUBLE,
    hi           DOUBLE,
    run_id       VARCHAR,
    PRIMARY KEY (study, size, score)
);

-- ... and per score, the trend against log(image-tower parameters) over the trained models, with
-- one verdict sentence per definition of "interpretable", stated whichever way it goes.
CREATE TABLE study_verdicts (
    study      VARCHAR NOT NULL,
    score      VARCHAR NOT NULL,
    definition VARCHAR NOT NULL,        -- what "more interpretable" means by this score
    direction  INTEGER NOT NULL,        -- +1: higher is more interpretable; -1: lower is
    n_models   INTEGER NOT NULL,        -- trained models in the fit
    slope      DOUBLE,                  -- least-squares slope per tenfold of image-tower parameters
    slope_lo   DOUBLE,                  -- its 95 % t interval
    slope_hi   DOUBLE,
    p_value    DOUBLE,                  -- two-sided permutation p of the slope (scores permuted over models)
    verdict    VARCHAR NOT NULL,        -- one sentence
    run_id     VARCHAR,
    PRIMARY KEY (study, score)
);

-- ----------------------------------------------------------------------------- renamed scores
DROP VIEW property_heads;
DROP VIEW model_scores;
DROP VIEW layer_scores;
DROP VIEW head_scores;

-- One row per analysed head: as 002, with the within-head entropy under its own name:
--   tag_entropy(h) = -sum_b q_b ln q_b / ln(min(k, B)) over the tag buckets of the head's k texts
--   (0: one property, 1: uniformly mixed; see 002 for B and the 'unknown' bucket).
--   association(h) = mean over the k texts of match(t_i, p(h)): the paper's "property consistency
--   within heads", per head (paper_scores averages it over the heads that carry a property).
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
CREATE VIEW layer_scores AS
SELECT
    model_id, layer,
    avg(association)  FILTER (WHERE property IS NOT NULL)        AS association,
    avg(tag_entropy)  FILTER (WHERE property IS NOT NULL)        AS tag_entropy,
    CAST(count(*) FILTER (WHERE property IS NOT NULL) AS INTEGER) AS n_heads,
    CAST(count(*) AS INTEGER)                                     AS n_analysed_heads
FROM head_scores
GROUP BY model_id, layer;

-- One row per model: means over its labelled heads ('mixed' heads included: their association is
-- 0 by tag, since no text is tagged 'mixed').
CREATE VIEW model_scores AS
SELECT
    model_id,
    avg(association)  FILTER (WHERE property IS NOT NULL)        AS association,
    avg(tag_entropy)  FILTER (WHERE property IS NOT NULL)        AS tag_entropy,
    CAST(count(*) FILTER (WHERE property IS NOT NULL) AS INTEGER) AS n_heads,
    CAST(count(*) AS INTEGER)                                     AS n_analysed_heads,
    CAST(count(*) FILTER (WHERE property = 'mixed') AS INTEGER)   AS n_mixed_heads,
    CAST(count(DISTINCT property) FILTER (WHERE property <> 'mixed') AS INTEGER) AS n_properties,
    stddev_samp(association)  FILTER (WHERE property IS NOT NULL) AS association_std,
    stddev_samp(tag_entropy)  FILTER (WHERE property IS NOT NULL) AS tag_entropy_std
FROM head_scores
GROUP BY model_id;

-- One row per (model, head label): as 002 (variance_concentration: of all variance explained by
-- texts tagged with the property, the share that falls in heads labelled with it).
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
    avg(s.tag_entropy)                                             AS tag_entropy,
    avg(s.confidence)                                              AS confidence,
    any_value(t.var_in_heads / nullif(t.var_all, 0))               AS variance_concentration
FROM head_scores s
JOIN totals tot USING (model_id)
LEFT JOIN tagged t USING (model_id, property)
WHERE s.property IS NOT NULL
GROUP BY s.model_id, s.property;

-- ----------------------------------------------------------------------------- the paper's scores
-- Madasu, Gandelsman, Lal, Howard, "Quantifying and Enabling the Interpretability of CLIP-like
-- Models", arXiv 2409.06579 (2024): "new metrics which measure property consistency within heads
-- and property disentanglement across heads"; "larger CLIP models ... exhibit reduced entanglement
-- and higher property-consistency". The paper's own formulas could not be retrieved here (the
-- stored copies of the paper hold its abstract and introduction, not its metrics section), so
-- these are READINGS of its words, not its formulas:
--   association(model)  = mean over the heads that carry a property (label not 'mixed') of
--                         association(h) = (1/k) sum_i match(t_i, p(h)): consistency within heads.
--   entanglement(model) = sum_p (n_p - 1) / sum_p n_p, n_p = the heads labelled with property p
--                         (not 'mixed'): the share of property heads that repeat a property another
--                         head already carries. 0: every property in one head; -> 1: a few
--                         properties spread over many heads. It counts the heads the authors' public
--                         follow-up code calls entangled (github.com/avinashsai/CCS-CLIP,
--                         src/association.py, get_entagled_heads: a head whose label another head
--                         of the model also has, the first of each label not counted).
--                         Bounded below by 1 - P / N with P properties and N property heads: with
--                         the shapes world's 7 properties a 48-head model cannot score below 0.85
--                         once every head carries one, so it is read beside the number of heads.
-- Both run on any labels (offline tags or an LLM), with match by tag or by the judge.
CREATE VIEW paper_scores AS
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
    SELECT model_id, avg(association) AS association,
           stddev_samp(association) / sqrt(count(*)) AS association_se
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

-- ----------------------------------------------------------------------------- agreement beyond chance
-- Every labelling of the heads the agreement views compare: the product's labels ('labeler'), the
-- tag-shuffled labeler's draws, and one constant labeler per category (every head the same label:
-- each factor's property, or 'mixed').
CREATE VIEW head_labelings AS
SELECT model_id, 'labeler' AS labeling, 0 AS draw, layer, head, property FROM head_labels
UNION ALL
SELECT model_id, baseline, draw, layer, head, property FROM baseline_labels
UNION ALL
SELECT h.model_id, 'constant:' || c.property, 0, h.layer, h.head, c.property
FROM head_labels h
CROSS JOIN (SELECT property FROM factor_properties UNION ALL SELECT 'mixed') c;

-- One row per (model, shapes dataset, labelling, draw, head): the label's category and the true one
-- (MATH.md §11). Categories: the world's factors and 'none'.
--   label_category = the factor whose property the label is; 'none' for 'mixed'; 'other' for a
--                    property of no factor (an LLM's 'animals' on a toy).
--   true_category  = the factor of a specialised head; for an unspecialised head, the label's
--                    factor when that factor explains >= 0.2 of the head's variance; else 'none'.
--   wrong          = a specialised head labelled with another factor's property.
--   invented       = any head (specialised or not, random controls included) labelled with a
--                    property whose factor explains < 0.2 of its variance (a property of no factor
--                    explains none).
CREATE VIEW labeling_truth AS
SELECT
    t.model_id,
    t.dataset_id,
    l.labeling,
    l.draw,
    t.layer,
    t.head,
    t.head_name,
    t.specialised,
    t.true_factor,
    l.property                                                    AS label,
    fp.factor                                                     AS label_factor,
    coalesce(v.eta2, 0.0)                                         AS label_eta2,
    CASE WHEN l.property = 'mixed' THEN 'none'
         WHEN fp.factor IS NULL THEN 'other'
         ELSE fp.factor END                                       AS label_category,
    CASE WHEN t.specialised THEN t.true_factor
         WHEN coalesce(v.eta2, 0.0) >= 0.2 THEN fp.factor
         ELSE 'none' END                                          AS true_category,
    coalesce(t.specialised AND fp.factor IS NOT NULL AND fp.factor <> t.true_factor, false) AS wrong,
    (l.property <> 'mixed' AND coalesce(v.eta2, 0.0) < 0.2)       AS invented
FROM head_truth t
JOIN head_labelings l USING (model_id, layer, head)
LEFT JOIN factor_properties fp ON fp.property = l.property
LEFT JOIN head_factor_variance v
       ON v.model_id = t.model_id AND v.dataset_id = t.dataset_id AND v.layer = t.layer
      AND v.head = t.head AND v.factor = fp.factor;

-- One row per (model, dataset, labelling, draw): Cohen's kappa between label and true category
-- over all heads, kappa = (p_o - p_e) / (1 - p_e), p_o = the share of heads whose categories agree,
-- p_e = sum_c (heads labelled c / n)(heads truly c / n); NULL when p_e = 1 (one category on both
-- sides: no agreement beyond chance can be shown). Plus the counts of wrong and invented labels.
CREATE VIEW labeling_agreement AS
WITH cats AS (
    SELECT model_id, dataset_id, labeling, draw, label_category AS category, 1 AS n_label, 0 AS n_true
    FROM labeling_truth
    UNION ALL
    SELECT model_id, dataset_id, labeling, draw, true_category, 0, 1 FROM labeling_truth
),
chance AS (
    SELECT model_id, dataset_id, labeling, draw, sum(nl * nt) AS s
    FROM (SELECT model_id, dataset_id, labeling, draw, category, sum(n_label) AS nl, sum(n_true) AS nt
          FROM cats GROUP BY model_id, dataset_id, labeling, draw, category)
    GROUP BY model_id, dataset_id, labeling, draw
),
counts AS (
    SELECT model_id, dataset_id, labeling, draw,
           count(*)                                               AS n_heads,
           count(*) FILTER (WHERE label_category = true_category) AS n_agree,
           count(*) FILTER (WHERE specialised)                    AS n_specialised,
           count(*) FILTER (WHERE wrong)                          AS n_wrong,
           count(*) FILTER (WHERE invented)                       AS n_invented
    FROM labeling_truth
    GROUP BY model_id, dataset_id, labeling, draw
)
SELECT
    c.model_id, c.dataset_id, c.labeling, c.draw,
    CAST(c.n_heads AS INTEGER)                                    AS n_heads,
    CAST(c.n_agree AS INTEGER)                                    AS n_agree,
    CAST(c.n_specialised AS INTEGER)                              AS n_specialised,
    CAST(c.n_wrong AS INTEGER)                                    AS n_wrong,
    CAST(c.n_invented AS INTEGER)                                 AS n_invented,
    c.n_agree / c.n_heads                                         AS accuracy,
    h.s / (c.n_heads * c.n_heads)                                 AS expected,
    CASE WHEN h.s < c.n_heads * c.n_heads
         THEN (c.n_agree / c.n_heads - h.s / (c.n_heads * c.n_heads)) / (1 - h.s / (c.n_heads * c.n_heads))
    END                                                           AS kappa
FROM counts c
JOIN chance h USING (model_id, dataset_id, labeling, draw);

-- Bootstrap over heads (1,000 resamples of a model's n heads with replacement, chosen by DuckDB's
-- hash of (model, dataset, resample, slot), the same heads for every labelling): per resample, the
-- labeler's kappa, the tag-shuffled draws' mean kappa, and the margin between them. A kappa that
-- is undefined on a resample (p_e = 1) is NULL there and left out (of the draws' mean, and of the
-- quantiles when it is the labeler's).
CREATE VIEW label_kappa_bootstrap AS
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
       avg(kappa) FILTER (WHERE labeling = 'tag-shuffled')                     AS shuffled_kappa,
       any_value(kappa) FILTER (WHERE labeling = 'labeler')
           - avg(kappa) FILTER (WHERE labeling = 'tag-shuffled')               AS margin_shuffled
FROM kappas
GROUP BY model_id, dataset_id, b;

-- One row per (model, shapes dataset): the product's labels against the truth, beside the two
-- baselines the product computes itself.
--   kappa (and its 95 % percentile interval over the head bootstrap); accuracy = p_o.
--   wrong_rate = wrong / specialised heads, invented_rate = invented / all heads (Wilson intervals).
--   best constant labeler: the constant label with the highest accuracy; its kappa is 0 by
--   construction (p_o = p_e for any constant labelling; 0 also where p_e = 1).
--   tag-shuffled labeler: mean, standard deviation, min and max over its draws (draws whose kappa
--   is undefined left out).
--   margin_shuffled = kappa - the shuffled draws' mean kappa, with its bootstrap interval (the same
--   resampled heads on both sides); margin_constant = kappa - 0, with kappa's interval.
CREATE VIEW label_kappa AS
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
           avg(kappa)                               AS kappa_mean,
           stddev_samp(kappa)                       AS kappa_sd,
           min(kappa)                               AS kappa_min,
           max(kappa)                               AS kappa_max,
           avg(n_wrong / nullif(n_specialised, 0))                 AS wrong_rate,
           avg(n_invented / n_heads)                               AS invented_rate
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

-- ----------------------------------------------------------------------------- every score of a model
-- One row per (model, shapes dataset, score), long format, what the study and the Metrics page
-- read: the agreement scores (label_kappa), the paper's two (paper_scores, model-wide: the same on
-- every dataset) and the label-free ground truth (code_scores).
CREATE VIEW model_measures AS
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
    UNION ALL SELECT model_id, dataset_id, score, value, lo, hi FROM code_scores
);
