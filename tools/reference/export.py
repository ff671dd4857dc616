"""Export trained runs to Hugging Face folders (written after training starts; see export_all)."""
def export_all(*a, **k):
    raise SystemExit("export not written yet")
