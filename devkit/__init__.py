"""What the tests and the benchmarks share, so that neither imports the other: tiny random models and the bundled
tokenizer (models), the Streamlit server helpers a browser drives (browser), and running a bench script as a
subprocess (scripts). Not part of the library: nothing in dipsvd_core, pages or studio imports it."""
