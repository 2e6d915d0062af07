"""Recovery: the pure rules (``rules``: who rebuilds a lost stage, from what), their application
to a live engine (``apply``), the one driver that turns a lost stage into that application
(``driver``) for both causes of loss (``logical``: a seeded plan wipes a stage in a live process;
``process_loss``: a real process died), stage copies, the checkpoint fallback, and failure
injection (``injection``)."""
