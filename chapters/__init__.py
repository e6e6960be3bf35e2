"""The chapter scripts, one per chapter: run one with ``python chapters/chNN_<topic>.py`` (or, installed,
``python -m minillm.chapters.chNN_<topic>``); ``python -m minillm pipeline`` runs them in order."""
