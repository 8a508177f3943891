"""One module per pipeline stage; each has ``run(ctx)`` and declares ``OUTPUTS`` (cached array names),
``FILES`` (cached files it writes) and ``FILE_INPUTS`` (cached files it reads)."""
