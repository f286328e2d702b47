"""The Jupyter panel and %gpu magics (a later issue)."""
