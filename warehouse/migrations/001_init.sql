-- 001: the core warehouse. Vectors are FLOAT[] (one table holds models of different widths);
-- every vector is stored exactly as MATH.md defines it (unit image/text embeddings, head
-- embeddings as additive shares of the unit image embedding).

CREATE TABLE models (
    model_id        VARCHAR PRIMARY KEY,  -- 'ViT-B-16/laion2b_s34b_b88k', 'toy-shapes/bundled', 'ViT-B-32/random-seed0', 'ViT-B-16/ckpt-<sha12>'
    arch            VARCHAR NOT NULL,     -- open_clip architecture name
    pretrained      VARCHAR,              -- open_clip pretrained tag, NULL for checkpoint/random
    source          VARCHAR NOT NULL,     -- 'pretrained' | 'checkpoint' | 'random' | 'bundled'
    checkpoint_path VARCHAR,              -- local checkpoint file, when source = 'checkpoint'
    seed            INTEGER,              -- random-init seed, when source = 'random'
    layers          INTEGER NOT NULL,     -- transformer layers of the image tower
    heads           INTEGER NOT NULL,     -- attention heads per layer
    width           INTEGER NOT NULL,     -- residual width W
    embed_dim       INTEGER NOT NULL,     -- joint embedding size d
    patch_size      INTEGER NOT NULL,
    image_size      INTEGER NOT NULL,
    pooling         VARCHAR NOT NULL,     -- 'tok'
    analysed_layers INTEGER[] NOT NULL,   -- 0-based layers whose heads are stored
    onnx_path       VARCHAR,
    onnx_sha256     VARCHAR,
    created_at      TIMESTAMP DEFAULT current_timestamp
);

CREATE TABLE datasets (
    dataset_id VARCHAR PRIMARY KEY,       -- 'shapes:2000:seed=0', 'skimage', 'folder:<name>', 'csv:<name>'
    name       VARCHAR NOT NULL,
    source     VARCHAR NOT NULL,          -- 'shapes' | 'skimage' | 'folder' | 'csv'
    n_images   INTEGER,
    created_at TIMESTAMP DEFAULT current_timestamp
);

CREATE TABLE images (
    image_id   VARCHAR PRIMARY KEY,       -- '<dataset_id>/<relative path or index>'
    dataset_id VARCHAR NOT NULL,
    path       VARCHAR,                   -- file path or generator key
    sha256     VARCHAR,
    label      VARCHAR,                   -- class (ImageFolder subfolder, CSV label); NULL when unknown
    caption    VARCHAR,                   -- generated caption (shapes world) or CSV caption
    width      INTEGER,
    height     INTEGER,
    thumbnail  BLOB                       -- JPEG, longest side 128 px
);

-- Ground-truth factors of generated scenes (long format: one row per image and factor).
CREATE TABLE image_factors (
    image_id VARCHAR NOT NULL,
    factor   VARCHAR NOT NULL,            -- 'shape', 'color', 'size', 'position', 'count', 'pattern', 'background'
    value    VARCHAR NOT NULL,
    PRIMARY KEY (image_id, factor)
);

CREATE TABLE image_embeddings (
    model_id VARCHAR NOT NULL,
    image_id VARCHAR NOT NULL,
    vec      FLOAT[] NOT NULL USING COMPRESSION uncompressed,  -- [d], unit norm
    PRIMARY KEY (model_id, image_id)
);

CREATE TABLE head_embeddings (
    model_id VARCHAR NOT NULL,
    image_id VARCHAR NOT NULL,
    layer    INTEGER NOT NULL,            -- 0-based
    head     INTEGER NOT NULL,            -- 0-based
    -- [d], c[l,h] of MATH.md §1 (share of the unit embedding). Stored uncompressed: DuckDB's
    -- float compression (ALPRD) saves little on embeddings and makes neighbour scans ~2x slower.
    vec      FLOAT[] NOT NULL USING COMPRESSION uncompressed
);

-- rest term and per-component dataset means, for the ablation study (MATH.md §2)
CREATE TABLE component_means (
    model_id   VARCHAR NOT NULL,
    dataset_id VARCHAR NOT NULL,
    component  VARCHAR NOT NULL,          -- 'L11.H3', 'L11.attn', 'L11.mlp', 'embed', ...
    vec        FLOAT[] NOT NULL,
    PRIMARY KEY (model_id, dataset_id, component)
);

CREATE TABLE properties (
    property    VARCHAR PRIMARY KEY,      -- 'colors', 'locations', 'animals', ...
    description VARCHAR
);

CREATE TABLE texts (
    text_id  VARCHAR PRIMARY KEY,         -- sha1(bank || 0x00 || text), 16 hex chars
    bank     VARCHAR NOT NULL,            -- 'atlas' (the product's bank) or a user bank name
    text     VARCHAR NOT NULL,
    property VARCHAR                      -- property tag, NULL when unknown
);

CREATE TABLE text_embeddings (
    model_id VARCHAR NOT NULL,
    text_id  VARCHAR NOT NULL,
    vec      FLOAT[] NOT NULL,            -- [d], unit norm
    PRIMARY KEY (model_id, text_id)
);

CREATE TABLE head_texts (
    model_id           VARCHAR NOT NULL,
    layer              INTEGER NOT NULL,
    head               INTEGER NOT NULL,
    rank               INTEGER NOT NULL,  -- 0 = first chosen
    text_id            VARCHAR NOT NULL,
    variance_explained DOUBLE NOT NULL,   -- fraction of the head's total variance (MATH.md §3)
    dataset_id         VARCHAR,
    bank               VARCHAR,
    run_id             VARCHAR,
    PRIMARY KEY (model_id, layer, head, rank)
);

CREATE TABLE head_labels (
    model_id   VARCHAR NOT NULL,
    layer      INTEGER NOT NULL,
    head       INTEGER NOT NULL,
    property   VARCHAR NOT NULL,          -- a property of the vocabulary, or 'mixed'
    confidence DOUBLE,
    labeler    VARCHAR NOT NULL,          -- 'offline' | 'llm:<model>'
    prompt_hash VARCHAR,
    raw        VARCHAR,                   -- raw labeler answer
    run_id     VARCHAR,
    PRIMARY KEY (model_id, layer, head)
);

CREATE TABLE text_judgments (
    model_id   VARCHAR NOT NULL,
    layer      INTEGER NOT NULL,
    head       INTEGER NOT NULL,
    text_id    VARCHAR NOT NULL,
    property   VARCHAR NOT NULL,
    associated BOOLEAN NOT NULL,          -- match(text, property) of MATH.md §5
    judge      VARCHAR NOT NULL,          -- 'tag' | 'llm:<model>'
    run_id     VARCHAR,
    PRIMARY KEY (model_id, layer, head, text_id, property)
);

CREATE TABLE ablations (
    model_id   VARCHAR NOT NULL,
    dataset_id VARCHAR NOT NULL,
    factor     VARCHAR NOT NULL,          -- labelled target: a shapes factor or 'label'
    kind       VARCHAR NOT NULL,          -- 'baseline' | 'mlps' | 'attn_upto' | 'head'
    layer      INTEGER,                   -- for 'attn_upto' and 'head'
    head       INTEGER,                   -- for 'head'
    accuracy   DOUBLE NOT NULL,
    run_id     VARCHAR
);

CREATE TABLE probes (
    model_id   VARCHAR NOT NULL,
    dataset_id VARCHAR NOT NULL,
    layer      INTEGER NOT NULL,
    head       INTEGER NOT NULL,
    factor     VARCHAR NOT NULL,
    accuracy   DOUBLE NOT NULL,           -- held-out accuracy of a linear probe
    chance     DOUBLE NOT NULL,           -- majority-class accuracy on the same split
    run_id     VARCHAR,
    PRIMARY KEY (model_id, dataset_id, layer, head, factor)
);

CREATE TABLE runs (
    run_id      VARCHAR PRIMARY KEY,
    job         VARCHAR NOT NULL,
    params      JSON,
    status      VARCHAR NOT NULL,         -- 'running' | 'ok' | 'failed'
    started_at  TIMESTAMP DEFAULT current_timestamp,
    finished_at TIMESTAMP,
    error       VARCHAR
);

CREATE TABLE errors (
    run_id     VARCHAR,
    item       VARCHAR NOT NULL,          -- file path or item key
    reason     VARCHAR NOT NULL,
    created_at TIMESTAMP DEFAULT current_timestamp
);
