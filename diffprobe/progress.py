"""Progress on stderr (tqdm) that the caller can switch off; the library never prints otherwise."""


class progress_bar:
    """A tqdm bar on stderr when enabled, else a no-op with the same interface."""

    def __init__(self, enabled, total, desc="search"):
        self.enabled, self.total, self.desc = enabled, total, desc

    def __enter__(self):
        if self.enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=self.total, desc=self.desc, leave=False)
        return self

    def update(self, n=1):
        if self.enabled:
            self.bar.update(n)

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.close()
        return False
