"""Layer 7, input and output: the saved compressed folder (compressed), its code for plain transformers
(portable), its model card (model_card) and the JSON report (report). May import the layers below.
"""
