let test_greet () =
  Alcotest.(check string) "greets by name" "Hello, world!" (Hello.greet "world")

let test_empty () =
  Alcotest.(check string) "greets nobody" "Hello, !" (Hello.greet "")

let () =
  Alcotest.run "hello"
    [
      ( "greet",
        [
          Alcotest.test_case "world" `Quick test_greet;
          Alcotest.test_case "empty" `Quick test_empty;
        ] );
    ]
