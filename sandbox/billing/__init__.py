"""Billing: a contract's price list, and invoices computed from the audited usage of its contracts."""
