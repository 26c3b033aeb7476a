"""The outside world behind small interfaces: the PDF renderer, the document store.

Nothing here imports our other packages except settings.
"""
