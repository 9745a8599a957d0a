"""Training: the one loop every task kind trains with (``loop``), its learning-rate schedules
(``schedule``), run-time precision (``precision``), batches (``batch``) and seeded subsets
(``sampling``)."""
