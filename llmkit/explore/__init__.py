"""The internals explorer: an instrumented forward (trace.py) rendered as one offline HTML page (page.py)."""
