"""Layer 6, methods: one handler per compression method (handlers), Dobi-SVD (dobi, dobi_math) and the settings
of one compression (settings). May import the layers below.
"""
