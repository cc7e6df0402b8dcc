-- 006: the lossless original of images that have no file on disk (the generated shapes scenes),
-- so that live maps decompose exactly the pixels whose embedding is stored (issue 10).
-- PNG bytes of the decoded RGB pixels the embed job embedded; NULL for images read from a file
-- or from scikit-image (found again by path and checked against `sha256`) and for rows written
-- before this migration.
ALTER TABLE images ADD COLUMN original BLOB;
