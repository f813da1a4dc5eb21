"""The registry's aliases: `challenger` (set by registration, tasks/release/registry.py) and
`champion` (moved only by promotion, tasks/release/promotion.py). Their own module so that
registry and promotion both name them without importing each other."""

CHAMPION = "champion"
CHALLENGER = "challenger"
