"""Users' own loss functions (``--loss-fn FILE.py:NAME``) as pipelines: one adapter per
framework (:mod:`.adapter` fixes their contract)."""
