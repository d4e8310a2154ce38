"""Privacy budgets: what a DP query costs (`cost`) and the ledger that holds and spends it (`ledger`).

Below catalog, contracts and dp: it imports only the store and the errors, so a dataset's cap row and a
contract's ledger are created without importing the engine that spends them.
"""
