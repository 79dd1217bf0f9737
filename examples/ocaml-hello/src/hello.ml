let greet name = "Hello, " ^ name ^ "!"
