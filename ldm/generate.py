"""ldm-generate: text-to-image from a trained pipeline folder (filled in by the generation issue)."""


def main() -> None:
    raise SystemExit("ldm-generate: generation is not implemented yet (see the README's status section).")
