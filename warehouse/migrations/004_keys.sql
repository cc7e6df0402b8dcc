-- 004: keys that refuse duplicates, and the process behind each run.
--
-- Every table whose rows have a natural key now refuses a second row with the same key. 001 and
-- 003 already keyed models, datasets, images, image_factors, image_embeddings, component_means,
-- properties, texts, text_embeddings, head_texts, head_labels, text_judgments, probes, runs,
-- factor_properties and head_factor_variance. Two tables were left without one:
--
-- * head_embeddings: one row per (model_id, image_id, layer, head). A CSV manifest that listed a
--   file twice, or two `embed` processes on the same dataset, doubled rows here.
-- * ablations: one row per (model_id, dataset_id, factor, kind, layer, head), where layer is NULL
--   for 'baseline' and 'mlps' and head is NULL for all but 'head'. A primary key cannot hold NULL
--   columns and a plain UNIQUE treats NULLs as distinct, so the key is a unique index over
--   coalesce(layer, -1) and coalesce(head, -1) (layers and heads are 0-based, never -1).
--
-- `errors` is a log (one row per failed item and attempt) and keeps no key.
--
-- Upgrade: both tables are rebuilt under their key with the duplicates removed (head_embeddings
-- keeps the first row stored per key, ablations the last: a study is written whole, so its last
-- row is the newest), in the one transaction this migration runs in; every other row is kept.
-- No view reads head_embeddings or ablations (002 and 003 define none over them), so no view
-- needs to be dropped and recreated.

CREATE TABLE head_embeddings_keyed (
    model_id VARCHAR NOT NULL,
    image_id VARCHAR NOT NULL,
    layer    INTEGER NOT NULL,            -- 0-based
    head     INTEGER NOT NULL,            -- 0-based
    -- [d], c[l,h] of MATH.md §1 (share of the unit embedding). Stored uncompressed: DuckDB's
    -- float compression (ALPRD) saves little on embeddings and makes neighbour scans ~2x slower.
    vec      FLOAT[] NOT NULL USING COMPRESSION uncompressed,
    PRIMARY KEY (model_id, image_id, layer, head)
);

-- (table order is kept: a model that `optimize` clustered stays clustered)
INSERT INTO head_embeddings_keyed (model_id, image_id, layer, head, vec)
SELECT model_id, image_id, layer, head, vec FROM head_embeddings
WHERE rowid IN (SELECT min(rowid) FROM head_embeddings GROUP BY model_id, image_id, layer, head);

DROP TABLE head_embeddings;
ALTER TABLE head_embeddings_keyed RENAME TO head_embeddings;

CREATE TABLE ablations_keyed (
    model_id   VARCHAR NOT NULL,
    dataset_id VARCHAR NOT NULL,
    factor     VARCHAR NOT NULL,          -- labelled target: a shapes factor or 'label'
    kind       VARCHAR NOT NULL,          -- 'baseline' | 'mlps' | 'attn_upto' | 'head'
    layer      INTEGER,                   -- for 'attn_upto' and 'head'
    head       INTEGER,                   -- for 'head'
    accuracy   DOUBLE NOT NULL,
    run_id     VARCHAR
);

INSERT INTO ablations_keyed (model_id, dataset_id, factor, kind, layer, head, accuracy, run_id)
SELECT model_id, dataset_id, factor, kind, layer, head, accuracy, run_id FROM ablations
WHERE rowid IN (SELECT max(rowid) FROM ablations GROUP BY model_id, dataset_id, factor, kind, layer, head);

DROP TABLE ablations;
ALTER TABLE ablations_keyed RENAME TO ablations;

CREATE UNIQUE INDEX ablations_key
    ON ablations (model_id, dataset_id, factor, kind, coalesce(layer, -1), coalesce(head, -1));

-- The process that runs a job: a run still 'running' whose process is gone from this host is
-- shown as 'interrupted' (warehouse/runs.py mark_interrupted; the liveness check needs Python).
-- NULL for runs recorded before this migration.
ALTER TABLE runs ADD COLUMN pid INTEGER;
ALTER TABLE runs ADD COLUMN host VARCHAR;
