-- Check the global admission set against the job hashes (the truth): members whose job is no
-- longer queued (or is gone) leave it. Run by workers now and then; idempotent.
-- KEYS: queued
return reconcile(KEYS[1], {queued = true})
