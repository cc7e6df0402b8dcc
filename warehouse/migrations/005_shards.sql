-- 005: Parquet shard sets (written by `embed --engine ray`) registered with `python -m etl attach`.
--
-- A set is one shard directory ($ATLAS_HOME/shards/<model>/<dataset>/, with its manifest.json).
-- `images`, `image_factors` and `image_embeddings` rows are always copied in. `head_embeddings`
-- rows are copied in too (mode 'copy') unless the set has at least `--copy-below` of them: then
-- they stay in the Parquet files (mode 'in_place'), and while any set is in place the writer keeps
-- `head_embeddings` a VIEW: the table's own rows (renamed `head_embeddings_base`) UNION ALL
-- read_parquet(every in-place file). With no set in place, `head_embeddings` is the table of 001.
-- (warehouse/writes.py refresh_head_embeddings_view; CONTRIBUTING.md "Shards".)
CREATE TABLE shard_sets (
    shard_dir       VARCHAR PRIMARY KEY,  -- absolute path of the shard directory
    model_id        VARCHAR NOT NULL,
    dataset_id      VARCHAR NOT NULL,
    mode            VARCHAR NOT NULL,     -- 'copy' | 'in_place'
    manifest_sha256 VARCHAR NOT NULL,     -- sha256 of the manifest.json that was attached
    n_shards        INTEGER NOT NULL,
    n_images        INTEGER NOT NULL,
    n_head_rows     BIGINT NOT NULL,
    files           VARCHAR[] NOT NULL,   -- head_embeddings Parquet files read in place (empty for 'copy')
    run_id          VARCHAR,
    attached_at     TIMESTAMP DEFAULT current_timestamp
);
