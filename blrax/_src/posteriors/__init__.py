"""The posterior types (each implements ``base.Posterior``)."""
