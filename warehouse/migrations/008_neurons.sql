-- 008: neurons, the second-order lens (MATH.md §10; issue 23), written by `python -m etl neurons`.
-- For neuron n of MLP layer l, phi_n(I) [d] is its effect on the unit image embedding through the
-- later attention heads (on the scale of head_embeddings.vec); alpha_n(I) [K] its one scalar per later
-- head (K = (layers - 1 - l) * heads, heads in the order (l+1, 0), (l+1, 1), ..., (layers-1, heads-1)),
-- and for a tower read by an attention pool of M heads (SigLIP's MAP, CoCa's pooler) one per later head
-- and pool head: P = K * M paths (l', h, m), m fastest. M = 1 for class-token and average towers.
-- "norm" below is ||phi_n(I)||. Summaries are always stored; per-image alpha only with --store-alpha.

-- One row per analysed MLP layer: what the neurons' rows were computed over and with.
CREATE TABLE neuron_layers (
    model_id      VARCHAR NOT NULL,
    layer         INTEGER NOT NULL,       -- the MLP layer l (0-based)
    dataset_id    VARCHAR NOT NULL,       -- the images every statistic is over
    n_images      INTEGER NOT NULL,
    n_neurons     INTEGER NOT NULL,       -- N, the layer's hidden width
    later_heads   INTEGER NOT NULL,       -- K, the later attention heads the effects run through
    pool_heads    INTEGER NOT NULL DEFAULT 1,   -- M, the heads of the attention pool that reads the tower
                                          -- (1 without one); alpha holds K * M values per neuron
    reach         DOUBLE,                 -- mean over a probe sample of ||sum_n phi_n - its mean||: how much
                                          -- the layer's neurons move the embedding through later heads
                                          -- (what --layers auto ranks by)
    bank          VARCHAR,                -- the text bank of the sparse decompositions
    texts_k       INTEGER NOT NULL,       -- at most this many texts per neuron (orthogonal matching pursuit)
    pc_images     INTEGER NOT NULL,       -- the principal direction is taken over this many top images
    matters_share DOUBLE NOT NULL,        -- 'matters' = among the fewest images holding this share of
                                          -- sum_I ||phi_n(I)||^2 (see neuron_stats.share_matters)
    alpha_stored  BOOLEAN NOT NULL,       -- whether neuron_alpha holds this layer's per-image alpha
    run_id        VARCHAR,
    created_at    TIMESTAMP DEFAULT current_timestamp,
    PRIMARY KEY (model_id, layer)
);

-- One row per neuron of an analysed layer.
CREATE TABLE neuron_stats (
    model_id      VARCHAR NOT NULL,
    layer         INTEGER NOT NULL,
    neuron        INTEGER NOT NULL,       -- 0-based index into the layer's hidden units (c_fc outputs)
    mean_norm     DOUBLE NOT NULL,        -- mean over the images of ||phi_n(I)||
    q50           DOUBLE NOT NULL,        -- quantiles of ||phi_n(I)|| over the images
    q90           DOUBLE NOT NULL,
    q99           DOUBLE NOT NULL,
    max_norm      DOUBLE NOT NULL,
    share_matters DOUBLE NOT NULL,        -- the share of images where the neuron matters: the fewest
                                          -- images (largest norms first) that together hold
                                          -- neuron_layers.matters_share of sum_I ||phi_n(I)||^2, over all
                                          -- images (uniform effects give about matters_share; the paper's
                                          -- selective neurons, a few %)
    hist_max      DOUBLE NOT NULL,        -- the histogram of ||phi_n(I)||: equal bins over [0, hist_max] ...
    hist_counts   INTEGER[] NOT NULL,     -- ... with these image counts
    pc            FLOAT[] NOT NULL,       -- [d] unit: the first principal direction of phi_n over its top
                                          -- pc_images images (uncentred, so that effect ~ coefficient * pc),
                                          -- signed so that those images' mean projection on it is positive
    pc_share      DOUBLE NOT NULL,        -- the share of those images' sum ||phi_n||^2 along pc
    recon_r2      DOUBLE NOT NULL,        -- cos^2(pc, its sparse text reconstruction) (neuron_texts)
    run_id        VARCHAR,
    PRIMARY KEY (model_id, layer, neuron)
);

-- The images of largest ||phi_n(I)||, rank 0 first.
CREATE TABLE neuron_top_images (
    model_id   VARCHAR NOT NULL,
    layer      INTEGER NOT NULL,
    neuron     INTEGER NOT NULL,
    rank       INTEGER NOT NULL,
    image_id   VARCHAR NOT NULL,
    norm       DOUBLE NOT NULL,           -- ||phi_n(I)||
    projection DOUBLE NOT NULL,           -- phi_n(I) . pc
    PRIMARY KEY (model_id, layer, neuron, rank)
);

-- The sparse text decomposition of pc: pc ~ sum_rank coef * t_hat(text), in the order chosen.
CREATE TABLE neuron_texts (
    model_id VARCHAR NOT NULL,
    layer    INTEGER NOT NULL,
    neuron   INTEGER NOT NULL,
    rank     INTEGER NOT NULL,            -- 0 = chosen first
    text_id  VARCHAR NOT NULL,
    coef     DOUBLE NOT NULL,             -- its coefficient in the least-squares fit on the chosen texts
    gain     DOUBLE NOT NULL,             -- how much recon_r2 grew when it was added (sums to recon_r2)
    PRIMARY KEY (model_id, layer, neuron, rank)
);

-- Labels from the texts (the offline labeler of MATH.md §4, gains as the texts' weights), and the
-- same rule run with the bank's tags shuffled (labeling 'tag-shuffled', one row per draw): the
-- baseline that the chance-corrected agreement is read against.
CREATE TABLE neuron_labels (
    model_id    VARCHAR NOT NULL,
    layer       INTEGER NOT NULL,
    neuron      INTEGER NOT NULL,
    labeling    VARCHAR NOT NULL,         -- 'labeler' | 'tag-shuffled'
    draw        INTEGER NOT NULL,         -- 0 for the labeler; the seeded permutation of the shuffled tags
    property    VARCHAR NOT NULL,         -- a property of the vocabulary, or 'mixed'
    confidence  DOUBLE,
    labeler     VARCHAR NOT NULL,         -- 'offline'
    prompt_hash VARCHAR,
    p_value     DOUBLE,
    raw         VARCHAR,
    run_id      VARCHAR,
    PRIMARY KEY (model_id, layer, neuron, labeling, draw)
);

-- How much of the neuron's effect goes through each later head: the mean over the images of the norm of
-- its effect through that head, ||sum_m alpha[n, (k, m)] u[n, (k, m)]|| (= mean |alpha[n, k]| * ||u[n, k]||
-- when M = 1; what "the neurons behind a head" ranks by).
CREATE TABLE neuron_head_effects (
    model_id   VARCHAR NOT NULL,
    layer      INTEGER NOT NULL,
    neuron     INTEGER NOT NULL,
    head_layer INTEGER NOT NULL,
    head       INTEGER NOT NULL,
    effect     DOUBLE NOT NULL,
    PRIMARY KEY (model_id, layer, neuron, head_layer, head)
);

-- eta2 of MATH.md §7 for the effects phi_n over a shapes dataset's images (exactly as for heads).
CREATE TABLE neuron_factor_variance (
    model_id   VARCHAR NOT NULL,
    dataset_id VARCHAR NOT NULL,
    layer      INTEGER NOT NULL,
    neuron     INTEGER NOT NULL,
    factor     VARCHAR NOT NULL,
    eta2       DOUBLE NOT NULL,
    run_id     VARCHAR,
    PRIMARY KEY (model_id, dataset_id, layer, neuron, factor)
);

-- The paper's check on the toy eval (etl/world/evaluate.py): zero-shot accuracy with every neuron's
-- effect of the layer replaced. variant: 'baseline' (nothing replaced), 'zero' (phi_n -> 0), 'mean'
-- (phi_n -> its mean over the dataset), 'rank1' (phi_n -> (phi_n . pc) pc), 'sparse' (phi_n -> its
-- projection on the unit direction of pc's sparse text reconstruction).
CREATE TABLE neuron_ablations (
    model_id  VARCHAR NOT NULL,
    layer     INTEGER NOT NULL,
    eval      VARCHAR NOT NULL,           -- 'toy:seed=S:n=N' (the toy eval's held-out scenes)
    variant   VARCHAR NOT NULL,
    factor    VARCHAR NOT NULL,
    accuracy  DOUBLE NOT NULL,
    run_id    VARCHAR,
    PRIMARY KEY (model_id, layer, eval, variant, factor)
);

-- Per-image alpha of every neuron of a layer (only with --store-alpha): one row per image, so that a
-- layer of ViT-B (3,072 neurons x 24 later heads) is one list of 73,728 floats per image. P = K * M
-- (neuron_layers.later_heads * pool_heads).
CREATE TABLE neuron_alpha (
    model_id VARCHAR NOT NULL,
    layer    INTEGER NOT NULL,
    image_id VARCHAR NOT NULL,
    alpha    FLOAT[] NOT NULL,            -- [N * P], neuron-major: alpha[n, p] at (1-based) index n * P + p + 1
    PRIMARY KEY (model_id, layer, image_id)
);

-- One row per (model, dataset, neuron): its top factor and whether it is specialised in it (the
-- head rule of MATH.md §7: eta2 >= 0.4 and >= 3 x the second factor's).
CREATE VIEW neuron_truth AS
WITH ranked AS (
    SELECT v.*, row_number() OVER (PARTITION BY model_id, dataset_id, layer, neuron
                                   ORDER BY eta2 DESC, factor) AS pos
    FROM neuron_factor_variance v
)
SELECT
    a.model_id,
    a.dataset_id,
    a.layer,
    a.neuron,
    a.factor                                                      AS top_factor,
    a.eta2                                                        AS top_eta2,
    coalesce(b.eta2, 0.0)                                         AS second_eta2,
    a.eta2 >= 0.4 AND a.eta2 >= 3 * coalesce(b.eta2, 0.0)         AS specialised,
    CASE WHEN a.eta2 >= 0.4 AND a.eta2 >= 3 * coalesce(b.eta2, 0.0) THEN a.factor END   AS true_factor,
    CASE WHEN a.eta2 >= 0.4 AND a.eta2 >= 3 * coalesce(b.eta2, 0.0) THEN fp.property END AS true_property
FROM ranked a
LEFT JOIN ranked b
       ON b.model_id = a.model_id AND b.dataset_id = a.dataset_id AND b.layer = a.layer
      AND b.neuron = a.neuron AND b.pos = 2
LEFT JOIN factor_properties fp ON fp.factor = a.factor
WHERE a.pos = 1;

-- One row per (model, dataset, labelling, draw, neuron): the label's category and the true one, as
-- for heads (MATH.md §11; the measures of issue 19):
--   label_category = the factor whose property the label is; 'none' for 'mixed'; 'other' for a
--                    property of no factor;
--   true_category  = the factor of a specialised neuron; for an unspecialised one, the label's
--                    factor when that factor explains >= 0.2 of its variance; else 'none'.
CREATE VIEW neuron_labeling_truth AS
SELECT
    t.model_id,
    t.dataset_id,
    l.labeling,
    l.draw,
    t.layer,
    t.neuron,
    t.specialised,
    t.true_factor,
    l.property                                                    AS label,
    CASE WHEN l.property = 'mixed' THEN 'none'
         WHEN fp.factor IS NULL THEN 'other'
         ELSE fp.factor END                                       AS label_category,
    CASE WHEN t.specialised THEN t.true_factor
         WHEN coalesce(v.eta2, 0.0) >= 0.2 THEN fp.factor
         ELSE 'none' END                                          AS true_category
FROM neuron_truth t
JOIN neuron_labels l USING (model_id, layer, neuron)
LEFT JOIN factor_properties fp ON fp.property = l.property
LEFT JOIN neuron_factor_variance v
       ON v.model_id = t.model_id AND v.dataset_id = t.dataset_id AND v.layer = t.layer
      AND v.neuron = t.neuron AND v.factor = fp.factor;

-- One row per (model, dataset, layer, labelling, draw): Cohen's kappa between label and true
-- category over the layer's neurons, kappa = (p_o - p_e) / (1 - p_e) with p_o the share of neurons
-- whose categories agree and p_e = sum_c (labelled c / n)(truly c / n); NULL when p_e = 1. The best
-- constant labeler's kappa is 0 by this definition; the 'tag-shuffled' rows are the chance baseline.
CREATE VIEW neuron_label_agreement AS
WITH cats AS (
    SELECT model_id, dataset_id, layer, labeling, draw, label_category AS category, 1 AS n_label, 0 AS n_true
    FROM neuron_labeling_truth
    UNION ALL
    SELECT model_id, dataset_id, layer, labeling, draw, true_category, 0, 1 FROM neuron_labeling_truth
),
chance AS (
    SELECT model_id, dataset_id, layer, labeling, draw, sum(nl * nt) AS s
    FROM (SELECT model_id, dataset_id, layer, labeling, draw, category, sum(n_label) AS nl, sum(n_true) AS nt
          FROM cats GROUP BY ALL)
    GROUP BY model_id, dataset_id, layer, labeling, draw
),
counts AS (
    SELECT model_id, dataset_id, layer, labeling, draw,
           count(*)                                                          AS n_neurons,
           count(*) FILTER (WHERE label_category = true_category)            AS n_agree,
           count(*) FILTER (WHERE specialised)                               AS n_specialised,
           count(*) FILTER (WHERE specialised AND label_category = true_factor) AS n_right
    FROM neuron_labeling_truth
    GROUP BY model_id, dataset_id, layer, labeling, draw
)
SELECT
    c.model_id, c.dataset_id, c.layer, c.labeling, c.draw,
    CAST(c.n_neurons AS INTEGER)                                  AS n_neurons,
    CAST(c.n_specialised AS INTEGER)                              AS n_specialised,
    CAST(c.n_right AS INTEGER)                                    AS n_right,
    CAST(c.n_agree AS INTEGER)                                    AS n_agree,
    c.n_agree / c.n_neurons                                       AS accuracy,
    h.s / (c.n_neurons * c.n_neurons)                             AS expected,
    CASE WHEN h.s < c.n_neurons * c.n_neurons
         THEN (c.n_agree / c.n_neurons - h.s / (c.n_neurons * c.n_neurons)) / (1 - h.s / (c.n_neurons * c.n_neurons))
    END                                                           AS kappa
FROM counts c
JOIN chance h USING (model_id, dataset_id, layer, labeling, draw);
