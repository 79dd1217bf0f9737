val greet : string -> string
(** [greet name] is a friendly greeting for [name]. *)
